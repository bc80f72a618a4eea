"""Contrastive pretraining, then 10 labels a class: does SimCLR beat logistic regression on pixels?

Issue 19, part 6. Per (image set, seed, pretraining setting), each in a fresh process:

  1. `recipes.contrastive_image_pretrain.main(Config(data_dir=<seed>/train-all,
     probe_dir=<seed>/train-all, probe_labels_per_class=10, seed, **setting))`: SimCLR on the
     seed's labelled pool with its labels ignored (Fashion-MNIST: 2,560 images; digits: 1,240;
     the seed's test images are not among them), then the recipe's own linear probe: 10
     images per class (drawn by `Probe` from the seed) train a logistic regression on the
     frozen features, every other pool image tests it.
  2. On exactly that split, the baselines: the same pixels the backbone sees (`decoded_images`
     at the run's image size, flattened, standardised) into scikit-learn's
     `LogisticRegression(max_iter=2000)` (`few_labels.py`'s pixels + LR), and into the
     recipe's own probe classifier (`linear_probe_accuracy`, what the SimCLR features get).
  3. With `--finetune`: `recipes.resnet50_image_classifier` at its defaults from the run
     directory (`--weights RUN_DIR`), trained on the probe's 10 images per class and scored on
     the seed's test folder (50 per class, never seen by pretraining), against pixels + LR on
     the same 100 training and 500 test images.

The settings are named in SETTINGS; `default` is the recipe's defaults as they are in this
checkout (nothing passed), the others override some fields.

    .venv/bin/python benchmarks/contrastive_few_labels.py --datasets fashion-mnist --seeds 0 \\
        --settings default --no-readme                                   # one run
    .venv/bin/python benchmarks/contrastive_few_labels.py --finetune     # README section
    .venv/bin/python benchmarks/contrastive_few_labels.py --settings "" --merge a.json \
        --merge b.json                                  # a section from earlier --save-json runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    add_common_arguments,
    dispatch,
    emit_result,
    machine_facts,
    markdown_table,
    publish,
    quiet_tensorflow,
    run_child,
)

SCRIPT = str(Path(__file__).resolve())
SECTION = "contrastive_few_labels"
DATA_ROOT = "~/.cache/tfxfer-benchmarks/few-labels"
LABELS_PER_CLASS = 10
LR_MAX_ITER = 2000
# Pretraining settings: overrides of the recipe's defaults ("default" passes nothing).
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "probe5": {"image_size": 32, "epochs": 5, "color_jitter": 0.5},
    "g20": {
        "image_size": 32,
        "epochs": 20,
        "batch_size": 64,
        "temperature": 0.2,
        "color_jitter": 0.0,
        "grayscale": 0.0,
        "val_fraction": 0.0,
        "verbose": 2,
    },
    "g20noflip": {
        "image_size": 32,
        "epochs": 20,
        "batch_size": 64,
        "temperature": 0.2,
        "color_jitter": 0.0,
        "grayscale": 0.0,
        "val_fraction": 0.0,
        "verbose": 2,
        "flip": False,
    },
    "g20jitter": {
        "image_size": 32,
        "epochs": 20,
        "batch_size": 64,
        "temperature": 0.2,
        "color_jitter": 0.5,
        "val_fraction": 0.0,
        "verbose": 2,
    },
    "g30noflipjitter": {
        "image_size": 32,
        "epochs": 30,
        "batch_size": 64,
        "temperature": 0.2,
        "color_jitter": 0.5,
        "val_fraction": 0.0,
        "verbose": 2,
        "flip": False,
    },
}


# === Children ===


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def child(spec: dict[str, Any]) -> None:
    quiet_tensorflow()
    started, cpu = time.perf_counter(), _cpu()
    kind = spec.pop("kind")
    actions = {"pixels": _pixels_baseline, "pretrain": _pretrain, "finetune": _finetune}
    result = actions[kind](**spec)
    emit_result({**result, "wall_s": time.perf_counter() - started, "cpu_s": _cpu() - cpu})


def _sklearn_lr(train, test, seed: int) -> float:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    model = LogisticRegression(max_iter=LR_MAX_ITER, random_state=seed)
    model.fit(scaler.fit_transform(train[0]), train[1])
    return float(np.mean(model.predict(scaler.transform(test[0])) == test[1]))


def _pixels(paths: list[str], image_size: int):
    import numpy as np

    from tfxfer.pretrain.contrastive_data import decoded_images

    images = decoded_images(paths, image_size).batch(256)
    return np.concatenate([np.asarray(b, np.float32).reshape(len(b), -1) for b in images])


def _probe(data_dir: str, probe_labels: int, seed: int):
    from tfxfer.data.images import scan_image_folder
    from tfxfer.pretrain.contrastive_finish import Probe

    return Probe(scan_image_folder(data_dir), probe_labels, seed)  # the recipe's own split


def _pixels_baseline(
    data_dir: str, seed: int, probe_labels: int, image_size: int
) -> dict[str, Any]:
    """Pixels + LR on the split the recipe's probe uses (same images, same size)."""
    import numpy as np

    from tfxfer.pretrain.contrastive_finish import linear_probe_accuracy

    probe = _probe(data_dir, probe_labels, seed)
    labels = np.asarray(probe.examples.labels)
    pixels = _pixels(list(probe.examples.inputs), image_size)
    train = (pixels[probe.train], labels[probe.train])
    test = (pixels[probe.test], labels[probe.test])
    classes = len(probe.examples.class_names)
    return {
        "pixels_lr": _sklearn_lr(train, test, seed),
        "pixels_probe": linear_probe_accuracy(train, test, classes, seed=seed),
        "probe_train": [str(probe.examples.inputs[i]) for i in probe.train],
        "probe_train_labels": [probe.examples.class_names[labels[i]] for i in probe.train],
        "probe_test_examples": len(probe.test),
    }


def _pretrain(
    data_dir: str, output_dir: str, seed: int, setting: dict[str, Any], probe_labels: int
) -> dict[str, Any]:
    from recipes.contrastive_image_pretrain import Config, main

    config = Config(
        data_dir=data_dir,
        probe_dir=data_dir,
        probe_labels_per_class=probe_labels,
        output_dir=output_dir,
        seed=seed,
        overwrite=True,
        **{"verbose": 0, **setting},
    )
    result = main(config)
    found = result["metrics"]["linear_probe"]
    history = result.get("history") or []
    return {
        "probe": found["pretrained_accuracy"],
        "probe_start": found["initial_accuracy"],
        "image_size": config.image_size,
        "backbone": config.backbone,
        "epochs": config.epochs,
        "last_loss": float(history[-1]["loss"]) if history else None,
    }


def _finetune(
    run_dir: str,
    train_files: list[str],
    train_labels: list[str],
    test_dir: str,
    output_dir: str,
    seed: int,
    backbone: str,
    image_size: int,
) -> dict[str, Any]:
    import numpy as np

    from recipes.resnet50_image_classifier import Config, main
    from tfxfer.data.images import scan_image_folder

    with tempfile.TemporaryDirectory(prefix="tfxfer-cfl-") as tmp:
        for path, label in zip(train_files, train_labels, strict=True):
            os.makedirs(os.path.join(tmp, label), exist_ok=True)
            os.symlink(path, os.path.join(tmp, label, os.path.basename(path)))
        config = Config(
            data_dir=tmp,
            test_dir=test_dir,
            output_dir=output_dir,
            backbone=backbone,
            weights=run_dir,
            image_size=image_size,
            export=False,
            verbose=0,
            quiet=True,
            seed=seed,
            overwrite=True,
        )
        result = main(config)
        accuracy = result["metrics"]["test"]["accuracy"]
        kept = (result["metrics"].get("selection") or {}).get("kept")
        train = scan_image_folder(tmp)
        test = scan_image_folder(test_dir)
        assert train.class_names == test.class_names
        pixels_lr = _sklearn_lr(
            (_pixels(list(train.inputs), image_size), np.asarray(train.labels)),
            (_pixels(list(test.inputs), image_size), np.asarray(test.labels)),
            seed,
        )
    return {"finetuned": accuracy, "kept": kept, "pixels_lr_test": pixels_lr}


# === Parent ===


def _mean_cell(values: list[float]) -> str:
    if not values:
        return "-"
    shown = ", ".join(f"{100 * v:.1f}" for v in values)
    return f"**{100 * statistics.mean(values):.1f}** ({shown})"


def parent(args) -> int:
    started, facts = time.perf_counter(), machine_facts()
    root = Path(args.data_root).expanduser()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"Unknown --settings {unknown}; known: {sorted(SETTINGS)}")
    runs: list[dict[str, Any]] = []
    for path in args.merge:  # rows of earlier runs (their own settings, seeds and code)
        runs += json.loads(Path(path).read_text("utf-8"))
    work = Path(tempfile.mkdtemp(prefix="tfxfer-cfl-runs-"))
    pixels: dict[tuple[str, int, int], dict[str, Any]] = {}
    for dataset in args.datasets.split(","):
        for seed in args.seeds:
            folder = root / dataset / f"seed-{seed}"
            for name in settings:
                out = work / f"{dataset}-{seed}-{name}"
                spec = {
                    "kind": "pretrain",
                    "data_dir": str(folder / "train-all"),
                    "output_dir": str(out / "pretrain"),
                    "seed": seed,
                    "setting": SETTINGS[name],
                    "probe_labels": args.labels_per_class,
                }
                row = {"dataset": dataset, "seed": seed, "setting": name}
                row.update(run_child(SCRIPT, spec, f"{dataset} seed {seed}: {name}"))
                row["pretrain_wall_s"] = row.pop("wall_s")
                key = (dataset, seed, row["image_size"])
                if key not in pixels:
                    spec = {
                        "kind": "pixels",
                        "data_dir": str(folder / "train-all"),
                        "seed": seed,
                        "probe_labels": args.labels_per_class,
                        "image_size": row["image_size"],
                    }
                    pixels[key] = run_child(SCRIPT, spec, f"{dataset} seed {seed}: pixels")
                row.update({k: v for k, v in pixels[key].items() if k not in ("wall_s", "cpu_s")})
                print(
                    f"     probe {100 * row['probe']:.1f}% (start {100 * row['probe_start']:.1f}"
                    f"%), pixels+LR {100 * row['pixels_lr']:.1f}%, pixels+probe "
                    f"{100 * row['pixels_probe']:.1f}%; pretraining {row['pretrain_wall_s']:.0f} s",
                    flush=True,
                )
                if args.finetune:
                    spec = {
                        "kind": "finetune",
                        "run_dir": str(out / "pretrain"),
                        "train_files": row["probe_train"],
                        "train_labels": row["probe_train_labels"],
                        "test_dir": str(folder / "test"),
                        "output_dir": str(out / "finetune"),
                        "seed": seed,
                        "backbone": row["backbone"],
                        "image_size": row["image_size"],
                    }
                    tuned = run_child(SCRIPT, spec, f"{dataset} seed {seed}: {name}, fine-tune")
                    row.update({f"finetune_{k}": v for k, v in tuned.items()})
                    print(
                        f"     fine-tuned {100 * tuned['finetuned']:.1f}% vs pixels+LR "
                        f"{100 * tuned['pixels_lr_test']:.1f}% on the test folder",
                        flush=True,
                    )
                del row["probe_train"], row["probe_train_labels"]
                runs.append(row)
                if args.save_json:
                    Path(args.save_json).write_text(json.dumps(runs, indent=1), "utf-8")
    body = results(runs, args)
    publish(SECTION, body, facts, started, write=not args.no_readme)
    return 0


def _shown(setting: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (setting or {}).items() if k != "verbose")


def results(runs: list[dict[str, Any]], args) -> str:
    lines = [
        f"- {args.labels_per_class} labels per class; cells: accuracy in %, **mean** (per seed, "
        "in the order of the seeds column)",
        "- probe columns: trained on the probe's 10 per class, tested on the rest of the "
        "seed's pool (train-all); pretraining saw those images without labels",
        "- settings: "
        + "; ".join(
            f"`{n}` = {_shown(SETTINGS.get(n)) or 'recipe defaults'}"
            for n in dict.fromkeys(r["setting"] for r in runs)
        ),
        "",
    ]
    headers = [
        "set",
        "setting",
        "seeds",
        "SimCLR probe",
        "pixels + LR (sklearn)",
        "pixels + probe's LR",
        "probe - pixels+LR (points)",
        "probe - pixels+probe's LR (points)",
        "probe at start",
    ]
    finetuned = any("finetune_finetuned" in r for r in runs)
    if finetuned:
        headers += ["fine-tuned from run (test folder)", "pixels + LR (test folder)"]
    headers += ["pretraining wall s (median)"]
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        for name in dict.fromkeys(r["setting"] for r in runs if r["dataset"] == dataset):
            mine = sorted(
                (r for r in runs if r["dataset"] == dataset and r["setting"] == name),
                key=lambda r: r["seed"],
            )
            gaps = [100 * (r["probe"] - r["pixels_lr"]) for r in mine]
            same = [100 * (r["probe"] - r["pixels_probe"]) for r in mine]
            row = [
                dataset,
                f"`{name}`",
                ", ".join(str(r["seed"]) for r in mine),
                _mean_cell([r["probe"] for r in mine]),
                _mean_cell([r["pixels_lr"] for r in mine]),
                _mean_cell([r["pixels_probe"] for r in mine]),
                f"{statistics.mean(gaps):+.1f} (" + ", ".join(f"{g:+.1f}" for g in gaps) + ")",
                f"{statistics.mean(same):+.1f} (" + ", ".join(f"{g:+.1f}" for g in same) + ")",
                _mean_cell([r["probe_start"] for r in mine]),
            ]
            if finetuned:
                row += [
                    _mean_cell(
                        [r["finetune_finetuned"] for r in mine if "finetune_finetuned" in r]
                    ),
                    _mean_cell(
                        [r["finetune_pixels_lr_test"] for r in mine if "finetune_finetuned" in r]
                    ),
                ]
            walls = [r["pretrain_wall_s"] for r in mine if r.get("pretrain_wall_s")]
            row.append(f"{statistics.median(walls):.0f}" if walls else "-")
            rows.append(row)
    lines.append(markdown_table(headers, rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="fashion-mnist,digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", default="default", help=f"from {sorted(SETTINGS)}")
    parser.add_argument("--labels-per-class", type=int, default=LABELS_PER_CLASS)
    parser.add_argument("--finetune", action="store_true", help="also fine-tune the image recipe")
    parser.add_argument("--data-root", default=DATA_ROOT)
    parser.add_argument(
        "--merge", action="append", default=[], help="a --save-json file of earlier runs"
    )
    add_common_arguments(parser)
    return dispatch(parser.parse_args(argv), child, parent)


if __name__ == "__main__":
    sys.exit(main())
