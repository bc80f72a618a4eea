"""Wrote the `.keras` files beside it with tfxfer as of commit 56e9d06 (before `tfxfer.layers`).

They hold every tfxfer class a model file can name but HubLayer (which needs a SavedModel),
so `tests/test_saving.py` can check that models saved before the move still load. Run from a
checkout of that commit:

    git archive 56e9d06 | tar -x -C /tmp/old && cd /tmp/old && PYTHONPATH=. \
      TFXFER_TESTS=tests python PATH/TO/THIS/make_models.py OUT_DIR
"""

import os
import sys

import keras
import numpy as np

sys.path.insert(0, os.environ["TFXFER_TESTS"])
from helpers import tiny_backbone  # noqa: E402

from tfxfer.export import RawTextModel, save_model  # noqa: E402
from tfxfer.fusion import build_fusion_model  # noqa: E402
from tfxfer.heads import MaskedSequencePooling  # noqa: E402
from tfxfer.pretrain.contrastive import ContrastiveAccuracy, NTXentLoss  # noqa: E402
from tfxfer.schedule import LayerwiseAdamW, WarmupCosine  # noqa: E402

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
keras.utils.set_random_seed(0)
# An image fusion model: ImagePreprocessing, GatedFusion; compiled with LayerwiseAdamW.
backbones = [tiny_backbone(image_size=8, seed=0), tiny_backbone(image_size=8, seed=1)]
backbones[1].name = "tiny2"
model = build_fusion_model(backbones, 2, fusion="gated")
model.compile(
    optimizer=LayerwiseAdamW(
        lr_multipliers={"x": 0.5}, learning_rate=WarmupCosine(1e-3, 10, 2), weight_decay=0.01
    ),
    loss="sparse_categorical_crossentropy",
)
images = np.random.RandomState(0).randint(0, 255, (2, 8, 8, 3)).astype("uint8")
np.save(os.path.join(out, "fusion_inputs.npy"), images)
np.save(os.path.join(out, "fusion_outputs.npy"), model.predict(images, verbose=0))
save_model(model, os.path.join(out, "fusion.keras"))
# A text classifier behind its tokenizer: RawTextModel, MaskedSequencePooling; compiled with
# the contrastive loss and metric (only their names and configs matter here).
vectorize = keras.layers.TextVectorization(
    vocabulary=["the", "match", "went", "to", "extra", "time"], output_sequence_length=6
)
tokens = keras.Input((6,), dtype="int64", name="token_ids")
sequence = keras.layers.Embedding(10, 4)(tokens)
mask = keras.ops.cast(keras.ops.not_equal(tokens, 0), "float32")
pooled = MaskedSequencePooling("mean")(sequence, mask)
classifier = keras.Model(tokens, keras.layers.Dense(2, activation="softmax")(pooled))
text_model = RawTextModel(vectorize, classifier)
text_model.compile(optimizer="adam", loss=NTXentLoss(0.2), metrics=[ContrastiveAccuracy()])
texts = ["the match went to extra time", "time"]
np.save(os.path.join(out, "text_outputs.npy"), text_model.predict(texts, verbose=0))
save_model(text_model, os.path.join(out, "text.keras"))
print(
    sorted(os.listdir(out)),
    [os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))],
)
