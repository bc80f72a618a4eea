"""`tfxfer rank` and `--backbone auto`: score candidate backbones before fine-tuning one.

Each candidate is built as a run would build it (the recipe's data, split and model, with
`backbone` set to the candidate), its pooled frozen features of the training split are
extracted once (`tfxfer.train.features`: inference mode, no augmentation, cached for the
process), and a transferability score (`tfxfer.transferability`: LogME by default, or the
H-score) says how well they suit the labels. No training happens. A candidate that cannot
be built (an offline preset, a text backbone in an image recipe) gets its one-line reason
and no score; the others are still ranked.

Candidates are what `--backbone` takes (names, keras-hub presets, Hugging Face folders,
`hub:` handles, run directories), one backbone each; `NAME@WEIGHTS` sets the weights with
it: an image recipe's `weights` (`efficientnetv2b0@imagenet`, `resnet50@none`,
`resnet50@path/to/notop.h5`), a text recipe's `pretrained` (`minilm-l6@none` for random
initialisation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import keras
import numpy as np

from tfxfer import fs
from tfxfer.boundary import user_error_message
from tfxfer.configfile import resolve
from tfxfer.distribute import Distribution
from tfxfer.errors import TfxferError
from tfxfer.model import task_of
from tfxfer.recipe.config import AUTO_BACKBONE, RecipeConfig
from tfxfer.recipe.start import BuildData, BuildModel, keeping_dtype_policy, prepare
from tfxfer.report.plots import plot_ranking
from tfxfer.rundir import RunDir
from tfxfer.train.features import STORE, split_at_head
from tfxfer.transferability import METRICS, transferability

DEFAULT_METRIC = "logme"
# What `tfxfer rank` writes into its folder, and all it may replace there.
RANK_FILES = ("rank.json", "rank.png")
# The key in rank.json that marks it as tfxfer rank's (a user's own rank.json is never replaced).
RANK_MARKER = "tfxfer_rank"


def parse_candidates(candidates) -> list[str]:
    """A list of candidate backbones from `a,b,c` or a list; refused when empty or repeated."""
    if isinstance(candidates, str):
        candidates = candidates.split(",")
    names = [str(c).strip() for c in candidates or [] if str(c).strip()]
    if not names:
        raise TfxferError(
            "No candidates to rank: pass --candidates a,b,c (backbones as --backbone takes "
            "them; NAME@WEIGHTS sets the weights too)."
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TfxferError(f"--candidates names {', '.join(repeated)} more than once.")
    return names


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise TfxferError(
            f"Unknown --metric {metric!r}: expected one of {', '.join(sorted(METRICS))} "
            "(logme for any task; hscore for classification)."
        )
    return metric


def candidate_config(config: RecipeConfig, candidate: str) -> RecipeConfig:
    """`config` with its backbone (and, after `@`, its weights) set to the candidate's."""
    if os.path.exists(os.path.expanduser(candidate)):  # a folder whose name holds an '@'
        name, weights = candidate, ""
    else:
        name, at, weights = candidate.partition("@")
        if at and not weights.strip():
            raise TfxferError(
                f"Candidate {candidate!r}: nothing after '@'. Write NAME@WEIGHTS "
                "(resnet50@none, efficientnetv2b0@imagenet), or the name alone."
            )
    changes: dict[str, Any] = {"backbone": name.strip(), "candidates": []}
    if weights:
        weights = weights.strip()
        if hasattr(config, "weights"):
            changes["weights"] = weights
        elif hasattr(config, "pretrained") and weights.lower() in ("none", "random"):
            changes["pretrained"] = False
        elif hasattr(config, "pretrained") and weights.lower() == "pretrained":
            changes["pretrained"] = True
        else:
            raise TfxferError(
                f"Candidate {candidate!r}: this recipe takes no weights after '@' but 'none' "
                "(random initialisation) or 'pretrained'."
            )
    changed = dataclasses.replace(config, **changes)
    problems = [
        p for p in changed.problems() if p.split("=", 1)[0] in ("backbone", "weights", "fusion")
    ]
    if problems:
        raise TfxferError(f"Candidate {candidate!r}: " + "; ".join(problems))
    return changed


def rank_candidates(
    config: RecipeConfig,
    build_data: BuildData,
    build_model: BuildModel,
    candidates,
    *,
    metric: str = DEFAULT_METRIC,
    output_dir: str | None = None,
    overwrite: bool = False,
    write: bool = True,
    distribution: Distribution | None = None,
) -> dict[str, Any]:
    """Scores every candidate's frozen features on the recipe's training split.

    Args:
        config: RecipeConfig. The recipe's config; its `backbone` is replaced per candidate.
        build_data, build_model: the recipe's.
        candidates: "a,b,c" or a list of backbones (see the module docstring).
        metric: str. "logme" (default) or "hscore".
        output_dir: str or None. Where `rank.json` and `rank.png` go; default: the config's
            `output_dir` + "-rank". A folder of its own: an earlier ranking there is
            replaced only with `overwrite`, and a folder holding anything else is refused.
        overwrite: bool. Replace an earlier ranking in `output_dir`.
        write: bool. Write the two files (False: only return the ranking).
        distribution: Distribution or None. A run's own (`--backbone auto`); default: one
            made from the config.

    Returns:
        A dict: `metric`, `candidates` (rows best first, failed ones last: `backbone`,
        `rank`, `score`, `feature_width`, `examples`, `seconds`, and `error` for a failure),
        `best` (the winner's candidate string), `seconds` and `output_dir` (or None).
    """
    names = parse_candidates(candidates)
    check_metric(metric)
    started = time.perf_counter()
    with keeping_dtype_policy():
        config = dataclasses.replace(config, quiet=True)
        if write:
            output_dir = output_dir or str(config.output_dir).rstrip("/") + "-rank"
            check_rank_folder(output_dir, overwrite=overwrite)
        if distribution is None:
            distribution = Distribution(
                config.strategy,
                config.mixed_precision,
                config.batch_size,
                config.scale_learning_rate,
            )
        data = build_data(config)
        rows = [
            _score(config, candidate, data, build_model, distribution=distribution, metric=metric)
            for candidate in names
        ]
    ranking = _ranked(rows, metric, time.perf_counter() - started)
    ranking["output_dir"] = output_dir if write else None
    if write:
        check_rank_folder(output_dir, overwrite=overwrite)  # again: minutes have passed
        fs.makedirs(output_dir)
        for name in RANK_FILES:  # no picture of an earlier ranking beside the new one
            if fs.exists(fs.join(output_dir, name)):
                fs.remove(fs.join(output_dir, name))
        fs.atomic_write_json(fs.join(output_dir, RANK_FILES[0]), {**ranking, RANK_MARKER: True})
        plot_ranking(ranking, fs.join(output_dir, RANK_FILES[1]))
    return ranking


def _written_by_rank(folder: str, name: str) -> bool:
    """Whether `name` in `folder` is a file `tfxfer rank` wrote: its rank.json says so (and
    a rank.png counts as its picture only beside such a rank.json)."""
    record = fs.join(folder, RANK_FILES[0])
    if not fs.isfile(record):
        return False
    try:
        with fs.open(record) as handle:
            return json.load(handle).get(RANK_MARKER) is True
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
        return False


def check_rank_folder(path: str, *, overwrite: bool) -> None:
    """Refuses a folder that holds anything but a ranking, or a ranking without `overwrite`."""
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise TfxferError(f"{path!r} is a file; rank writes a folder there. Pass another --output.")
    names = sorted(fs.listdir(path))
    others = [n for n in names if n not in RANK_FILES or not _written_by_rank(path, n)]
    if others:
        raise TfxferError(
            f"{path!r} holds files rank did not write ({', '.join(others[:5])}); it writes only "
            f"{' and '.join(RANK_FILES)} and never mixes them into another folder. Pass "
            "another --output."
        )
    if names and not overwrite:
        raise TfxferError(
            f"{path!r} already holds a ranking ({', '.join(names)}). Pass --overwrite to "
            "replace it (overwrite=True in Python), or another --output."
        )


def _score(config, candidate: str, data, build_model: BuildModel, *, distribution, metric) -> dict:
    """One candidate's row: its score, or the one-line reason it has none."""
    started = time.perf_counter()
    row: dict[str, Any] = {"backbone": candidate}
    try:
        keras.utils.set_random_seed(config.seed)
        prepared = prepare(
            candidate_config(config, candidate), lambda _: data, build_model, distribution
        )
        split = split_at_head(prepared.model)
        with distribution.scope():
            features, labels, _ = STORE.features(split.features, prepared.datasets().train.examples)
        features = np.asarray(features).reshape(len(features), -1)
        score = transferability(features, labels, task_of(prepared.model), metric)
        if not np.isfinite(score):
            raise TfxferError(f"its {metric} score is not a number ({score})")
        row.update(
            score=round(float(score), 6),
            feature_width=int(features.shape[1]),
            examples=int(len(features)),
        )
    except Exception as error:  # one candidate's failure must not stop the others
        message = (
            str(error)
            if isinstance(error, TfxferError)
            else user_error_message(error) or f"{type(error).__name__}: {error}"
        )
        row["error"] = " ".join(str(message).split())
    row["seconds"] = round(time.perf_counter() - started, 3)
    return row


def _ranked(rows: list[dict], metric: str, seconds: float) -> dict[str, Any]:
    scored = sorted((r for r in rows if "score" in r), key=lambda r: -r["score"])
    for rank, row in enumerate(scored, start=1):
        row["rank"] = rank
    failed = [{**r, "rank": None} for r in rows if "score" not in r]
    return {
        "metric": metric,
        "candidates": scored + failed,
        "best": scored[0]["backbone"] if scored else None,
        "seconds": round(seconds, 3),
    }


def ranking_table(ranking: dict[str, Any]) -> str:
    """The ranking as an aligned text table, one line per candidate, failures with why."""
    lines = [("rank", "candidate", ranking["metric"], "width", "seconds")]
    for row in ranking["candidates"]:
        score = "failed" if row.get("error") else f"{row['score']:.4f}"
        width = "" if row.get("error") else str(row["feature_width"])
        rank = "-" if row["rank"] is None else str(row["rank"])
        lines.append((rank, row["backbone"], score, width, f"{row['seconds']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    for row in ranking["candidates"]:
        if row.get("error"):
            text.append(f"{row['backbone']}: {row['error']}")
    return "\n".join(text)


def winner(ranking: dict[str, Any]) -> str:
    """The best candidate; a clear error when none could be scored."""
    if ranking["best"] is None:
        reasons = "; ".join(f"{r['backbone']}: {r['error']}" for r in ranking["candidates"])
        raise TfxferError(f"No candidate backbone could be ranked ({reasons}).")
    return ranking["best"]


def choose_backbone(
    config: RecipeConfig, build_data: BuildData, build_model: BuildModel, distribution
):
    """`--backbone auto`: ranks `config.candidates`; returns the winner's config, the data and
    the ranking (None, and the config as it is, without `auto`).

    The data are read once, for the ranking and the run (`build_data` of the returned triple
    gives them back).
    """
    if config.backbone != AUTO_BACKBONE:
        return config, build_data, None
    data = build_data(config)

    def same_data(_):
        return data

    ranking = _recorded_ranking(config)  # a resumed run fine-tunes what it started with
    if ranking is None:
        ranking = rank_candidates(
            config,
            same_data,
            build_model,
            config.candidates,
            metric=config.rank_metric,
            write=False,
            distribution=distribution,
        )
    best = winner(ranking)
    if not config.quiet:
        print(ranking_table(ranking), flush=True)
        print(
            f"[tfxfer] --backbone auto: fine-tuning {best} ({ranking['seconds']:.0f} s of ranking)"
        )
    chosen = candidate_config(config, best)
    RunDir.check_inputs(chosen.output_dir, chosen.input_paths())
    # The winner starts from the seed, as `--backbone WINNER` would, not from wherever
    # building the candidates left the random state.
    keras.utils.set_random_seed(config.seed)
    return chosen, same_data, ranking


def _recorded_ranking(config: RecipeConfig) -> dict[str, Any] | None:
    """The ranking a run being resumed recorded in its config.json, or None."""
    path = fs.join(str(config.output_dir), "config.json")
    if not config.resume or not fs.exists(path):
        return None
    with fs.open(path) as handle:
        ranking = json.load(handle).get("ranking")
    return ranking if isinstance(ranking, dict) and ranking.get("best") else None


def rank_backbones(
    target: str,
    candidates,
    *,
    settings: list[str] | tuple[str, ...] = (),
    metric: str = DEFAULT_METRIC,
    output_dir: str | None = None,
    overwrite: bool = False,
    write: bool = True,
) -> dict[str, Any]:
    """`tfxfer rank` in Python: a recipe name or config file, its `--set` settings, candidates.

    ```python
    ranking = tfxfer.rank_backbones(
        "resnet50_image_classifier",
        "resnet50@none,mobilenetv3small@none",
        settings=["data_dir=photos/", "image_size=64"],
    )
    ranking["best"], ranking["candidates"][0]["score"]
    ```
    """
    module, config = resolve(target, list(settings))
    if not isinstance(config, RecipeConfig) or not hasattr(module, "build_model"):
        raise TfxferError(
            f"rank is for the fine-tuning recipes (bert_text_classifier, "
            f"resnet50_image_classifier, ...); {target!r} is not one."
        )
    return rank_candidates(
        config,
        module.build_data,
        module.build_model,
        candidates,
        metric=metric,
        output_dir=output_dir,
        overwrite=overwrite,
        write=write,
    )


def ranking_lines(ranking: dict[str, Any]) -> list[str]:
    """One JSON object per candidate (`--json`)."""
    return [json.dumps(row, sort_keys=True) for row in ranking["candidates"]]
