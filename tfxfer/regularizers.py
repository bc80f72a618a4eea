"""The joint objective L_T + λ·L_S: terms that keep fine-tuning close to the source task.

Fine-tuning on few labels at a high learning rate forgets what pretraining learned. The
texts on transfer learning write the fix as one objective: the target task's loss L_T plus
λ times a term L_S that measures how far the model has moved from its pretrained self. A
stage picks L_S with `Stage(regularizer=..., regularizer_weight=λ)`:

- "l2sp": λ/2·‖θ − θ₀‖² over the backbone's weights. It needs no forward pass, so it lives in
  the optimizer (`tfxfer.schedule.LayerwiseAdamW`), applied decoupled like weight decay.
- "features": λ·mean((f(x) − f₀(x))²), the distance between the pooled features the head
  reads and those of a frozen copy of the pretrained backbone on the same batch (feature-map
  regularisation in the spirit of DELTA, Li et al., ICLR 2019; DELTA weights channels by
  their importance to the source task, this form weights them equally, and the mean makes λ
  independent of the feature width).
- "source_task": λ·T²·KL(p₀(x)^(1/T) ‖ p(x)^(1/T)) with T = 2, where p is the source task's
  prediction through the head the checkpoint came with (ImageNet's 1000 classes for a
  keras.applications backbone built with `source_head=True`), from the model being trained,
  and p₀ the same from the frozen copy (Learning without Forgetting, Li & Hoiem, 2016). The
  source head itself stays frozen.

The frozen copy is made once, when `run_schedule` starts (so before a resume restores
anything, from the same pretrained weights the model was built from: θ₀ is recomputed, not
checkpointed). It costs one more backbone's weights in memory (`reference_bytes` in a run's
`stages.json`; MiniLM-L6: 91 MB, ResNet50: 94 MB in float32) and one more forward pass, in
inference mode, per training step. The term is added during training only: the validation
loss stays the target task's own, so the best epoch is picked on the target task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops

from tfxfer.backbones.base import Backbone, SourceHead
from tfxfer.errors import TfxferError

# Regularizers that need the frozen copy's forward pass.
NEEDS_REFERENCE = ("features", "source_task")
TEMPERATURE = 2.0


def needs_reference(stages) -> list[str]:
    """The forward-pass regularizers `stages` use with λ > 0, in a fixed order."""
    used = {s.regularizer for s in stages if s.regularizer_weight and s.regularizer}
    return [kind for kind in NEEDS_REFERENCE if kind in used]


@dataclass
class Reference:
    """A frozen copy of the model's regularized tensors at θ₀, and the live tensors.

    Args:
        live: dict. Regularizer to the symbolic tensor of the model being trained.
        frozen: keras.Model or None. Inputs to the same tensors (in `kinds` order) from a
            copy of the backbone at θ₀; never trained, always run in inference mode. None
            when no regularizer needs it (a masked-LM source task needs no copy).
        kinds: list[str]. The regularizers covered.
        bytes: int. Memory of the frozen copy's weights.
        masked_lm: the backbone and its masked-LM head, when "source_task" means the
            checkpoint's masked-LM loss.
    """

    live: dict
    frozen: keras.Model | None
    kinds: list[str]
    bytes: int
    masked_lm: tuple[Backbone, SourceHead] | None = None

    def objective(self, model: keras.Model, kind: str, weight: float) -> keras.Model:
        """`model` with λ·L_S added to its training loss (the same layers, not a copy)."""
        if kind == "source_task" and self.masked_lm is not None:
            backbone, head = self.masked_lm
            return MaskedLMObjective(model, backbone, head, weight)
        trunk = keras.Model(model.input, [model.outputs[0], self.live[kind]])
        index = [k for k in self.kinds if k in self.live].index(kind)
        return JointObjective(trunk, self.frozen, index, kind, weight)


def build_reference(
    model: keras.Model, backbones: Backbone | Sequence[Backbone], kinds: list[str]
) -> Reference:
    """The frozen copy for `kinds`, cloned from `model` as it is now (call it before training).

    Raises:
        TfxferError: "source_task" on a backbone without a source head, or with a head
            pooling other than the one the source head reads.
    """
    live, masked_lm = {}, None
    if "features" in kinds:
        live["features"] = model.get_layer("head_features").output
    if "source_task" in kinds:
        backbone, head = source_head_of(backbones)
        if head.kind == "masked_lm":
            # The source task's own loss on the training texts: no frozen copy needed.
            masked_lm = (backbone, head)
        else:
            live["source_task"] = _source_predictions(model, backbones)
    cloned = [kind for kind in kinds if kind in live]
    if not cloned:
        return Reference(live, None, list(kinds), 0, masked_lm)
    source = keras.Model(model.input, [live[kind] for kind in cloned])
    frozen = keras.models.clone_model(source)
    frozen.set_weights(source.get_weights())
    frozen.trainable = False
    size = sum(int(ops.size(v)) * _itemsize(v.dtype) for v in frozen.weights)
    return Reference(live, frozen, list(kinds), size, masked_lm)


def _itemsize(dtype) -> int:
    return {"float16": 2, "bfloat16": 2, "float64": 8, "int64": 8}.get(str(dtype), 4)


def check_regularizers(stages, backbones: Backbone | Sequence[Backbone]) -> None:
    """Raises `TfxferError` before training if a stage's regularizer cannot run on `backbones`.

    Call it once the model is built (it reads the head's pooling).
    """
    if "source_task" in needs_reference(stages):
        source_head_of(backbones)


def source_head_of(backbones: Backbone | Sequence[Backbone]) -> tuple[Backbone, SourceHead]:
    """The one backbone with a source head, and that head; raises `TfxferError` if none."""
    backbones = [backbones] if isinstance(backbones, Backbone) else list(backbones)
    with_heads = [b for b in backbones if b.source_heads]
    if not with_heads:
        names = ", ".join(repr(b.name) for b in backbones)
        raise TfxferError(
            f"regularizer='source_task' keeps the source task's predictions, but the backbone "
            f"{names} carries no source-task head (heads it has: none). keras.applications "
            "backbones keep ImageNet's classifier when built with "
            "`build_backbone(name, weights='imagenet' or a weights file with the top, "
            "source_head=True)`, and BERT its masked-LM head from a keras-hub preset saved "
            "from a BertMaskedLM (`source_head=True`, recipe --regularizer source_task); a "
            "checkpoint without such a head has none. Use regularizer 'l2sp' or 'features'."
        )
    if len(with_heads) > 1:
        raise TfxferError(
            "regularizer='source_task' takes one source head, and "
            f"{[b.name for b in with_heads]} each carry one. Build the others without it."
        )
    backbone = with_heads[0]
    name, head = next(iter(backbone.source_heads.items()))
    _check_pooling(backbone, name, head)
    return backbone, head


def _source_predictions(model: keras.Model, backbones: Backbone | Sequence[Backbone]):
    """The source head's output on the model's own pooled features (a symbolic tensor)."""
    backbone, head = source_head_of(backbones)
    backbones = [backbones] if isinstance(backbones, Backbone) else list(backbones)
    head.layer.trainable = False  # it measures forgetting; it does not learn
    return head.layer(_pooled(model, backbones, backbone))


def _check_pooling(backbone: Backbone, name: str, head: SourceHead) -> None:
    if head.kind == "classifier" and backbone.head_pooling != head.pooling:
        raise TfxferError(
            f"{backbone.name!r}'s source head {name!r} reads {head.pooling!r}-pooled features, "
            f"but the model pools with {backbone.head_pooling!r}. Build the model with "
            f"HeadConfig(pooling={head.pooling!r}) (--pooling {head.pooling}) for "
            "regularizer='source_task'."
        )


def _pooled(model: keras.Model, backbones: list[Backbone], backbone: Backbone):
    """The symbolic pooled features of `backbone` inside `model`."""
    if len(backbones) == 1:
        return model.get_layer("head_features").input
    joined = model.get_layer("pooled_features").input
    return joined[backbones.index(backbone)]


class JointObjective(keras.Model):
    """The model being trained, with λ·L_S added to its loss in training steps.

    Not saved or exported: it wraps the model's own layers (`trunk` shares them) for the
    stage's `fit`, as the cached-features head model does.
    """

    def __init__(self, trunk, frozen, index, kind, weight, **kwargs):
        super().__init__(name=f"{trunk.name}_with_{kind}", **kwargs)
        self.trunk = trunk
        self.frozen = frozen
        self.index = int(index)
        self.kind = kind
        self.weight = float(weight)

    def call(self, inputs, training=False):
        predictions, live = self.trunk(inputs, training=training)
        if training:
            frozen = self.frozen(inputs, training=False)
            if isinstance(frozen, (list, tuple)):
                frozen = frozen[self.index]
            self.add_loss(self.weight * self.term(live, ops.stop_gradient(frozen)))
        return predictions

    def term(self, live, frozen):
        """L_S on one batch, in float32 (mixed precision computes the networks in 16 bits)."""
        live, frozen = ops.cast(live, "float32"), ops.cast(frozen, "float32")
        if self.kind == "features":
            return ops.mean(ops.square(live - frozen))
        # KL between the tempered source predictions (probabilities in, so work in logs).
        log_p = ops.log_softmax(ops.log(ops.maximum(live, 1e-7)) / TEMPERATURE, axis=-1)
        log_q = ops.log_softmax(ops.log(ops.maximum(frozen, 1e-7)) / TEMPERATURE, axis=-1)
        kl = ops.sum(ops.exp(log_q) * (log_q - log_p), axis=-1)
        return ops.mean(kl) * TEMPERATURE**2


class MaskedLMObjective(keras.Model):
    """A text model with λ times the source task's own masked-LM loss added in training.

    Each training step masks 15% of each text's tokens (never padding, [CLS] or [SEP]; of
    those, 80% become [MASK], 10% a random token, 10% stay: BERT's rule) and runs the
    backbone once more, on the masked texts, through the checkpoint's masked-LM head, which
    stays frozen (its output matrix is the token embedding, which trains with the backbone).
    The classifier itself sees the unmasked texts.
    """

    def __init__(self, classifier, backbone: Backbone, head: SourceHead, weight, **kwargs):
        import keras_hub

        super().__init__(name=f"{classifier.name}_with_masked_lm", **kwargs)
        self.classifier = classifier
        self.network = backbone.network
        self.head = head.layer
        self.head.trainable = False
        self.weight = float(weight)
        length = int(getattr(backbone.preprocessor, "sequence_length", 128))
        self.generator = keras_hub.layers.MaskedLMMaskGenerator(
            vocabulary_size=head.classes,
            mask_selection_rate=0.15,
            mask_token_id=head.masking["mask_token_id"],
            mask_selection_length=max(1, int(np.ceil(0.15 * length))),
            unselectable_token_ids=head.masking["unselectable_token_ids"],
        )

    def call(self, inputs, training=False):
        predictions = self.classifier(inputs, training=training)
        if training:
            masked = self.generator(inputs["token_ids"])
            features = self.network({**inputs, "token_ids": masked["token_ids"]}, training=True)
            logits = self.head(features["sequence_output"], mask_positions=masked["mask_positions"])
            losses = keras.losses.sparse_categorical_crossentropy(
                masked["mask_ids"], ops.cast(logits, "float32"), from_logits=True
            )
            weights = ops.cast(masked["mask_weights"], "float32")
            loss = ops.sum(losses * weights) / ops.maximum(ops.sum(weights), 1.0)
            self.add_loss(self.weight * loss)
        return predictions
