"""BERT-family text backbones: keras-hub presets, local preset dirs and Hugging Face checkpoints.

Every source ends in the same `Backbone`: a keras-hub `BertBackbone` wrapped so that it takes the
token dict a `BertTextClassifierPreprocessor` makes and hands the padding mask on to the head
(masked mean pooling needs it), plus that preprocessor, so raw strings never reach the user's
code. The preprocessor pads every text to `sequence_length`, but the network takes any length
up to it: the training pipeline trims each batch to its longest text
(`tfxfer.data.text_pipeline`), so short texts do not pay for a long maximum. Attention and the
head's pooling both skip padding, so a text gives the same output at any padded length.

Where the weights come from, and the checks on them before they are read, is
`tfxfer.backbones.text_sources`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import keras
from safetensors import SafetensorError

from tfxfer.backbones.base import Backbone, SourceHead, split_into_groups
from tfxfer.backbones.from_run import is_run_dir, pretraining_output, text_parts_from_run
from tfxfer.backbones.text_sources import TEXT_BACKBONES, read_json, resolve_source
from tfxfer.backbones.text_sources import sha256_of_file as sha256_of_file
from tfxfer.errors import TfxferError, WeightsError

_TOKEN_INPUTS = ("token_ids", "segment_ids", "padding_mask")


def build_bert_backbone(
    source: str | os.PathLike[str],
    *,
    sequence_length: int = 128,
    weights: bool = True,
    expected_sha256: str | None = None,
    allow_download: bool = True,
    source_head: bool = False,
    layers: int | None = None,
) -> Backbone:
    """Builds a BERT backbone and its tokenizer from a name, a preset or a local directory.

    One function covers the four places BERT weights live, so a recipe takes a single string
    whether it runs online, offline with a copied checkpoint, or on the bundled MiniLM.

    Args:
        source: str. One of: a row of `TEXT_BACKBONES` (`"minilm-l6"`, `"bert-tiny"`, ...); a
            keras-hub BertBackbone preset name (`"bert_tiny_en_uncased"`), downloaded by
            keras-hub unless cached; a local keras-hub preset directory (`config.json`,
            `tokenizer.json`, `model.weights.h5`, `assets/tokenizer/vocabulary.txt`); or a
            local Hugging Face BERT directory (`config.json` with `"model_type": "bert"`,
            `model.safetensors`, `vocab.txt`, optionally `tokenizer_config.json`, whose
            `do_lower_case` defaults to `True`); or the directory of a finished tfxfer text
            run, whose fine-tuned backbone and tokenizer it takes (its head stays behind).
        sequence_length: int. Maximum tokens per text, `[CLS]` and `[SEP]` included: the
            preprocessor truncates longer texts and pads shorter ones to it, and the network
            takes token dicts of any length up to it (batches trimmed to their longest text).
            At most the model's maximum. Defaults to `128`.
        weights: bool. `False` builds the same architecture randomly initialised (the weights
            file is then neither needed nor read). Defaults to `True`.
        expected_sha256: str or None. For a local Hugging Face directory, the SHA-256 its
            `model.safetensors` must have; a mismatch raises `WeightsError`. Defaults to `None`.
        allow_download: bool. `False` never touches the network: a preset that is not in the
            kagglehub cache fails at once. Defaults to `True`.
        source_head: bool. Also keep the checkpoint's masked-LM head as
            `source_heads["masked_lm"]`, for `Stage(regularizer="source_task")` (an auxiliary
            masked-LM loss on the training texts). It needs a keras-hub preset directory saved
            from a `BertMaskedLM` (its `task.json`); other checkpoints carry no head. Defaults
            to `False`.
        layers: int or None. Keep the embeddings, pooler and first `layers` transformer
            layers only (`build_backbone("minilm-l6:layers=3")`). Defaults to every layer.

    Returns:
        A `Backbone` with `output_kind="sequence"`, `input_kind="text"`, a network taking
        `{"token_ids", "segment_ids", "padding_mask"}` of shape `(batch, length)` for any
        length up to `sequence_length` and returning `{"sequence_output", "pooled_output",
        "padding_mask"}`, the keras-hub preprocessor that maps raw strings (also inside
        `tf.data`) to that dict, padded to `sequence_length`, and layer groups `embeddings`,
        `layer_0` ... `layer_{n-1}`, `pooler`.

    Example:

    ```python
    backbone = build_bert_backbone("minilm-l6", sequence_length=64)
    ds = tf.data.Dataset.from_tensor_slices((texts, labels)).batch(32)
    ds = ds.map(backbone.preprocessor)
    features = backbone.network(next(iter(ds))[0])
    ```
    """
    _check_arguments(source, sequence_length)
    source = str(source)
    info = _resolved_source(
        source,
        sequence_length=sequence_length,
        weights=weights,
        expected_sha256=expected_sha256,
        allow_download=allow_download,
    )
    kind, location = info["kind"], info["path"]
    import keras_hub  # heavy (TF Text, all models): only when a backbone is built

    # === Layers ===
    task = _masked_lm_task(kind, location, source, weights) if source_head else None
    bert, run_tokenizer = _load_bert(kind, location, source, weights=weights, task=task)
    full_depth, bert = bert.num_layers, _first_layers(bert, layers, source, task)
    _check_sequence_length(sequence_length, bert.max_sequence_length, source)
    tokenizer = run_tokenizer or _build_tokenizer(kind, location, source)
    _check_vocabulary(tokenizer, bert, source)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer=tokenizer, sequence_length=sequence_length
    )
    # === Config ===
    info.update(_architecture(bert, tokenizer, sequence_length))
    info.update({"layers_of_checkpoint": full_depth} if layers is not None else {})
    info.update({"source_heads": ["masked_lm"]} if task is not None else {})
    return Backbone(
        name=source if layers is None else f"{source}:layers={layers}",
        network=with_mask_passthrough(bert),
        preprocessor=preprocessor,
        output_kind="sequence",
        input_kind="text",
        layer_groups=bert_layer_groups(bert),
        lora_targets=bert_lora_targets(bert),
        info=info,
        namespace=source if source in TEXT_BACKBONES else "bert",
        default_pooling=info["pooling"],
        # Only CLS pooling reads BERT's pooler; under mean or max pooling it gets no gradient.
        pooling_groups={"pooler": ("cls",)},
        source_heads=_source_heads(task, tokenizer, bert),
    )


def _check_vocabulary(tokenizer, bert, source: str) -> None:
    if tokenizer.vocabulary_size() > bert.vocabulary_size:
        raise WeightsError(
            f"The vocabulary of {source!r} has {tokenizer.vocabulary_size()} tokens but the "
            f"model's embedding has only {bert.vocabulary_size} rows, so some token ids would "
            "index past it. The vocab file and the weights come from different models."
        )


def _architecture(bert, tokenizer, sequence_length: int) -> dict:
    """What `backbone_info` records of the network's shape (config.json, reports)."""
    return {
        "num_layers": bert.num_layers,
        "num_heads": bert.num_heads,
        "hidden_dim": bert.hidden_dim,
        "intermediate_dim": bert.intermediate_dim,
        "max_sequence_length": bert.max_sequence_length,
        "sequence_length": sequence_length,
        "vocab_size": bert.vocabulary_size,
        "lowercase": bool(tokenizer.lowercase),
    }


def _check_arguments(source, sequence_length) -> None:
    if (
        isinstance(sequence_length, bool)
        or not isinstance(sequence_length, int)
        or sequence_length < 3
    ):
        raise TfxferError(
            "Expected `sequence_length` to be an int of at least 3 ([CLS], one token, [SEP]). "
            f"Received: sequence_length={sequence_length!r}"
        )
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise WeightsError(
            "Expected `source` to be a backbone name, a preset or a directory. "
            f"Received: source={source!r}"
        )


def _resolved_source(
    source: str,
    *,
    sequence_length: int,
    weights: bool,
    expected_sha256: str | None,
    allow_download: bool,
) -> dict[str, Any]:
    """The backbone's `info` so far: where it comes from, its pooling, and checked files."""
    info: dict[str, Any] = {
        "source": source,
        "weights": "pretrained" if weights else "random",
        # The pooling the checkpoint was trained with, for a head to default to; None if unknown.
        "pooling": TEXT_BACKBONES.get(source, {}).get("pooling"),
    }
    info.update(
        resolve_source(
            source, weights=weights, expected_sha256=expected_sha256, allow_download=allow_download
        )
    )
    kind, location = info["kind"], info["path"]
    facts_file = Path(location) / "tfxfer.json"
    if kind == "keras_hub_preset_dir" and info["pooling"] is None and facts_file.is_file():
        # A preset tfxfer pretrained keeps the pooling its starting checkpoint was made for.
        info["pooling"] = read_json(facts_file).get("pooling")
    # Checked before any weights are read: the config says how long a text may be.
    if kind == "hf_checkpoint":
        config = read_json(Path(location) / "config.json")
        if isinstance(config.get("max_position_embeddings"), int):
            _check_sequence_length(sequence_length, config["max_position_embeddings"], source)
    elif kind == "keras_hub_preset_dir":
        config = read_json(Path(location) / "config.json").get("config", {})
        if isinstance(config.get("max_sequence_length"), int):
            _check_sequence_length(sequence_length, config["max_sequence_length"], source)
    return info


def _load_bert(kind: str, location: str, source: str, *, weights: bool, task):
    """The keras-hub `BertBackbone` (named "bert_backbone"), and a run's own tokenizer if any."""
    import keras_hub

    run_tokenizer = None
    try:
        if kind == "tfxfer_run":
            bert, run_tokenizer = text_parts_from_run(location)
            if not weights:
                bert = keras_hub.models.BertBackbone.from_config(bert.get_config())
            bert.name = "bert_backbone"
        elif task is not None:
            bert = task.backbone
        else:
            bert = keras_hub.models.BertBackbone.from_preset(
                location, load_weights=weights, name="bert_backbone"
            )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise WeightsError(
            f"keras-hub could not build a BertBackbone from {location!r} (source {source!r}): "
            f"{type(error).__name__}: {error}. Check that the directory holds a complete, "
            "uncorrupted BERT checkpoint, or pass `weights=False` to build it untrained."
        ) from error
    return bert, run_tokenizer


def _first_layers(bert, layers: int, source: str, task) -> keras.Model:
    """A `BertBackbone` of the embeddings, the first `layers` transformer layers and the pooler
    of `bert`, with their weights; `bert` itself for `layers=None`."""
    import keras_hub

    if layers is None:
        return bert
    if (
        isinstance(layers, bool)
        or not isinstance(layers, int)
        or not 1 <= layers <= bert.num_layers
    ):
        raise TfxferError(
            f"Backbone {source!r} has {bert.num_layers} transformer layers: ':layers=K' takes "
            f"K from 1 to {bert.num_layers}. Received: {layers!r}"
        )
    if task is not None:
        raise TfxferError(
            f"{source!r} with ':layers={layers}': the source_task regularizer needs the whole "
            "checkpoint its masked-LM head was trained on. Drop one of the two."
        )
    config = {**bert.get_config(), "num_layers": layers}
    smaller = keras_hub.models.BertBackbone.from_config(config)
    for layer in smaller.layers:
        if layer.weights:
            layer.set_weights(bert.get_layer(layer.name).get_weights())
    return smaller


def _source_heads(task, tokenizer, bert) -> dict[str, SourceHead]:
    """The checkpoint's masked-LM head, kept for `regularizer="source_task"`; else none."""
    if task is None:
        return {}
    special = (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id)
    return {
        "masked_lm": SourceHead(
            task.masked_lm_head,
            None,
            bert.vocabulary_size,
            kind="masked_lm",
            masking={
                "mask_token_id": int(tokenizer.mask_token_id),
                "unselectable_token_ids": [int(i) for i in special],
            },
        )
    }


def has_masked_lm_head(source: str) -> bool:
    """Whether `source` resolves to a keras-hub preset saved from a `BertMaskedLM`.

    Such a preset (a masked-LM pretraining run's, or `masked_lm.save_to_preset(dir)`) carries
    the checkpoint's masked-LM head; names, Hugging Face directories and fine-tuning runs do
    not. Reads only small JSON files; never loads weights or touches the network.
    """
    path = Path(str(source)).expanduser()
    if path.is_dir() and is_run_dir(path):
        try:
            pretrained = pretraining_output(path)
        except TfxferError:
            return False
        if pretrained is None:
            return False
        path = Path(pretrained["path"])
    task_file = path / "task.json"
    if not task_file.is_file():
        return False
    try:
        registered = str(read_json(task_file).get("registered_name", ""))
    except WeightsError:
        return False
    return registered.endswith("MaskedLM")


def _masked_lm_task(kind: str, location: str, source: str, weights: bool):
    """The keras-hub `BertMaskedLM` saved in a preset directory, or a `TfxferError`."""
    import keras_hub

    task_file = Path(location) / "task.json" if kind == "keras_hub_preset_dir" else None
    registered = ""
    if task_file is not None and task_file.is_file():
        registered = str(read_json(task_file).get("registered_name", ""))
    if not registered.endswith("MaskedLM"):
        raise TfxferError(
            f"regularizer='source_task' on text keeps the checkpoint's masked-LM loss, but "
            f"{source!r} carries no source-task head (heads it has: "
            f"{registered.rpartition('>')[2] or 'none'}). A keras-hub preset directory saved "
            "from a BertMaskedLM (`masked_lm.save_to_preset(dir)`) has one; Hugging Face "
            "BertModel checkpoints such as MiniLM have none. Use regularizer 'l2sp' or "
            "'features' instead."
        )
    try:
        task = keras_hub.models.BertMaskedLM.from_preset(
            location, preprocessor=None, load_weights=weights
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsError(
            f"keras-hub could not load the BertMaskedLM saved in {location!r}: "
            f"{type(error).__name__}: {error}"
        ) from error
    task.backbone.name = "bert_backbone"
    return task


def bert_lora_targets(bert: keras.Model) -> list[keras.layers.Layer]:
    """The attention query and value projections, where LoRA adapters go (as in the LoRA paper)."""
    return [
        layer
        for layer in bert._flatten_layers(include_self=False, recursive=True)
        if layer.name in ("query", "value") and hasattr(layer, "enable_lora")
    ]


def bert_layer_groups(bert: keras.Model) -> dict[str, list[keras.layers.Layer]]:
    """Splits a keras-hub `BertBackbone` into `embeddings`, `layer_0` ... `layer_{n-1}`, `pooler`.

    The groups hold the backbone's own layers (not the wrapping network), so setting
    `trainable` on them freezes exactly those weights.
    """
    boundaries = [("embeddings", "token_embedding")]
    boundaries += [(f"layer_{i}", f"transformer_layer_{i}") for i in range(bert.num_layers)]
    boundaries.append(("pooler", "pooled_dense"))
    return split_into_groups(bert.layers, boundaries)


def with_mask_passthrough(bert: keras.Model) -> keras.Model:
    """Wraps a BertBackbone so its outputs carry the padding mask a masked-pooling head needs.

    The inputs take any length: BERT slices its position embedding to the length it gets, so a
    batch trimmed to its longest text needs no padding up to the preprocessor's length.
    """
    inputs = {name: keras.Input(shape=(None,), dtype="int32", name=name) for name in _TOKEN_INPUTS}
    features = bert(inputs)
    outputs = {
        "sequence_output": features["sequence_output"],
        "pooled_output": features["pooled_output"],
        "padding_mask": inputs["padding_mask"],
    }
    return keras.Model(inputs, outputs, name="bert_network")


def _build_tokenizer(kind: str, location: str, source: str) -> keras.layers.Layer:
    import keras_hub

    try:
        if kind == "hf_checkpoint":
            # keras-hub's converter insists on tokenizer_config.json; a vocab.txt is enough for
            # BERT, and HF's own default for `do_lower_case` is True.
            tokenizer_config_path = Path(location) / "tokenizer_config.json"
            tokenizer_config = (
                read_json(tokenizer_config_path) if tokenizer_config_path.is_file() else {}
            )
            return keras_hub.models.BertTokenizer(
                vocabulary=str(Path(location) / "vocab.txt"),
                lowercase=bool(tokenizer_config.get("do_lower_case", True)),
            )
        return keras_hub.models.BertTokenizer.from_preset(location)
    except (OSError, ValueError) as error:
        raise WeightsError(f"Could not build the BERT tokenizer of {source!r}: {error}") from error


def _check_sequence_length(sequence_length: int, maximum: int, source: str) -> None:
    if sequence_length > maximum:
        raise TfxferError(
            f"sequence_length={sequence_length} is longer than {source!r} can take: its position "
            f"embedding has max_sequence_length={maximum}. Use sequence_length <= {maximum}."
        )
