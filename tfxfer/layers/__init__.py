"""Every Keras class tfxfer saves into a model file, one module each.

Each class is registered as `"tfxfer>ClassName"`, the name saved `.keras` files carry;
`tfxfer.saving.load_model` hands them all to Keras. The five fusion layers share one module
(`fusion_layers`): each is a few lines over a common base.
"""

from tfxfer.layers.contrastive_accuracy import ContrastiveAccuracy
from tfxfer.layers.fusion_layers import (
    AttentionFusion,
    ConcatFusion,
    FusionLayer,
    GatedFusion,
    ProductFusion,
    SumFusion,
)
from tfxfer.layers.hub_layer import HubLayer
from tfxfer.layers.image_preprocessing import ImagePreprocessing
from tfxfer.layers.layerwise_adamw import LayerwiseAdamW
from tfxfer.layers.masked_sequence_pooling import MaskedSequencePooling
from tfxfer.layers.nt_xent_loss import NTXentLoss
from tfxfer.layers.raw_text_model import RawTextModel
from tfxfer.layers.text_views import TokensAndText
from tfxfer.layers.tfidf_vectorizer import TfIdfVectorizer
from tfxfer.layers.warmup_cosine import WarmupCosine

__all__ = [
    "AttentionFusion",
    "ConcatFusion",
    "ContrastiveAccuracy",
    "FusionLayer",
    "GatedFusion",
    "HubLayer",
    "ImagePreprocessing",
    "LayerwiseAdamW",
    "MaskedSequencePooling",
    "NTXentLoss",
    "ProductFusion",
    "RawTextModel",
    "SumFusion",
    "TfIdfVectorizer",
    "TokensAndText",
    "WarmupCosine",
]
