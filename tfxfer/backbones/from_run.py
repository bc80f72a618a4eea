"""A finished tfxfer run as the next run's backbone: supervised transfer from task A to task B.

A run directory holds the whole trained model (`model.keras`) and what it was built from
(`config.json`'s `backbone_info`). `--weights runs/a/` (images) and `--backbone runs/a/`
(text) take the backbone out of it, leave its head behind, and check first that it is the
architecture asked for, so the next run starts from what run A learned on its own labels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import keras

from tfxfer.errors import TfxferError, WeightsError
from tfxfer.runs import read_config
from tfxfer.saving import load_model


def is_run_dir(path: str | os.PathLike) -> bool:
    """True for a directory a tfxfer run wrote (its `config.json` has `backbone_info`)."""
    return "backbone_info" in read_config(str(Path(path).expanduser()))


def pretraining_output(path: str | os.PathLike) -> dict[str, Any] | None:
    """What a pretraining run at `path` wrote for the fine-tuning recipes, or None.

    A pretraining run (`tfxfer.pretrain`) records its objective, modality and output entry
    in `config.json["pretraining"]`; the returned dict has those plus "path", the output's
    absolute path. None for a fine-tuning run, which holds a `model.keras` instead.

    Raises:
        WeightsError: the pretraining run has not written its output yet.
    """
    run = Path(path).expanduser()
    facts = read_config(str(run)).get("pretraining")
    if not isinstance(facts, dict) or "output" not in facts:
        return None
    output = run / str(facts["output"])
    if not output.exists():
        raise WeightsError(
            f"{str(path)!r} is a {facts.get('objective', '')} pretraining run with no "
            f"{facts['output']}, so no backbone in it: the run has not finished. Finish it "
            "(rerun it with --resume) and try again."
        )
    return {**facts, "path": str(output.resolve())}


def run_backbone_info(path: str | os.PathLike) -> dict[str, Any]:
    """The `backbone_info` of a finished single-backbone run; a clear error otherwise."""
    run = Path(path).expanduser()
    info = read_config(str(run))["backbone_info"]
    if "backbones" in info:
        names = [b.get("name") for b in info["backbones"]]
        raise TfxferError(
            f"{str(path)!r} is a fusion run over {names}: it holds several backbones, and a "
            "backbone is taken from a run over one. Take it from a single-backbone run."
        )
    if not (run / "model.keras").is_file():
        raise WeightsError(
            f"{str(path)!r} is a tfxfer run with no model.keras, so no backbone in it: the run "
            "has not finished. Finish it (rerun it with --resume) and try again."
        )
    return info


def _load(path: str | os.PathLike) -> keras.Model:
    return load_model(str(Path(path).expanduser() / "model.keras"))


def image_network_from_run(path: str | os.PathLike, name: str) -> keras.Model:
    """The trained image network (no head) of the run at `path`, built from backbone `name`."""
    info = run_backbone_info(path)
    if "vocab_size" in info or "sequence_length" in info:
        raise WeightsError(
            f"{str(path)!r} holds a text backbone ({info.get('name')!r}), and {name} takes "
            "images. Pass it as a text recipe's --backbone, or an image run here."
        )
    if info.get("name") != name:
        raise WeightsError(
            f"{str(path)!r} holds a {info.get('name')!r} backbone, not {name!r}: the weights "
            f"fit that architecture only. Pass --backbone {info.get('name')}, or a run of {name}."
        )
    model = _load(path)
    networks = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(networks) != 1:
        raise WeightsError(
            f"Cannot find the backbone network in {str(path)!r}'s model.keras: expected one "
            f"nested network, found {[n.name for n in networks]}."
        )
    return networks[0]


def load_network_weights(network: keras.Model, trained: keras.Model, source: str) -> None:
    """Copies `trained`'s weights into `network`, layer by layer, by name; checks shapes."""
    for layer in network.layers:
        if not layer.weights:
            continue
        try:
            other = trained.get_layer(layer.name)
        except ValueError:
            raise WeightsError(
                f"The backbone in {source!r} has no layer {layer.name!r}: it is another "
                "architecture than the one requested."
            ) from None
        shapes = [tuple(w.shape) for w in layer.weights]
        if shapes != [tuple(w.shape) for w in other.weights]:
            raise WeightsError(
                f"Layer {layer.name!r} of the backbone in {source!r} has weights of shapes "
                f"{[tuple(w.shape) for w in other.weights]}, expected {shapes}: another "
                "architecture (or width) than the one requested."
            )
        layer.set_weights(other.get_weights())


def text_parts_from_run(path: str | os.PathLike):
    """The trained BERT backbone and the tokenizer of the text run at `path`."""
    import keras_hub

    info = run_backbone_info(path)
    if "vocab_size" not in info:
        raise WeightsError(
            f"{str(path)!r} holds an image backbone ({info.get('name')!r}), not a BERT one. "
            "Pass it as an image recipe's --weights, or a text run here."
        )
    model = _load(path)
    berts = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras_hub.models.BertBackbone)
    ]
    tokenizer = getattr(getattr(model, "preprocessor", None), "tokenizer", None)
    if len(berts) != 1 or tokenizer is None:
        raise WeightsError(
            f"{str(path)!r}'s model.keras holds {len(berts)} BERT backbones and "
            f"{'a' if tokenizer is not None else 'no'} tokenizer; expected one of each (a text "
            "run of a BERT backbone, saved with its tokenizer)."
        )
    return berts[0], tokenizer
