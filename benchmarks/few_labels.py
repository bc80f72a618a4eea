"""Few labels: the recipes' defaults against simple baselines at 4 to 64 labels per class.

The claim under test: with 4-64 labels per class, tfxfer's recipes at their defaults beat
frozen features + logistic regression and keras-hub's own two-line fit, for text and for
images. Per (dataset, labels per class, seed), each variant in a fresh process:

  text (debian-sections, fortunes; see few_labels_data.py):
    tfxfer     `recipes.bert_text_classifier.main(Config(train, test, output_dir, export=False,
               verbose=0, quiet=True, seed))`: every training setting at its default
    keras-hub  `keras_hub.models.BertTextClassifier.from_preset(<MiniLM dir>, num_classes=k)`,
               keras-hub's default compile, `fit` 3 epochs at batch 16, 128 tokens
               (`real_text.py`'s variant (b))
    minilm-lr  frozen MiniLM-L6 (128 tokens), masked mean pooling, scikit-learn
               `LogisticRegression(max_iter=2000)` (default C)
    tfidf-lr   TF-IDF of word 1-2 grams (sublinear tf) + `LogisticRegression(max_iter=2000)`
  images (digits, fashion-mnist, any `--image-sets NAME=DIR`):
    tfxfer     `recipes.resnet50_image_classifier.main(Config(data_dir, test_dir, output_dir,
               export=False, verbose=0, quiet=True, seed, backbone, weights, image_size))`
               with `--image-backbone mobilenetv3small --image-weights none --image-size 32`
               (no pretrained weights offline); every training setting at its default
    pixels-lr  the PNG pixels at the same size, standardised, `LogisticRegression(max_iter=2000)`
    features-lr  the same randomly initialised backbone (seeded), frozen, average-pooled
               features in inference mode, standardised, `LogisticRegression(max_iter=2000)`

Wall and CPU time are the whole child process's (interpreter start, imports, data, model,
training, test predictions), measured by the parent (CPU: `getrusage(RUSAGE_CHILDREN)`).
Variant order alternates between seeds. Targets checked:
  (1) at every budget, tfxfer's mean >= the best baseline's mean + 2 points, and on no seed
      more than 1 point below that baseline;
  (2) text at 8 per class: tfxfer >= keras-hub + 10 points (mean) in no more wall time;
  (3) images, random weights: tfxfer far above chance (mean >= chance + 20 points) at every
      budget.

    .venv/bin/python benchmarks/few_labels.py build                         # data only
    .venv/bin/python benchmarks/few_labels.py --budgets 8 --seeds 0 --datasets fortunes,digits \\
        --no-readme                                                          # a smoke run
    .venv/bin/python benchmarks/few_labels.py                               # everything, README
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    _NOISE,
    RESULT_PREFIX,
    add_common_arguments,
    child_environment,
    dispatch,
    emit_result,
    facts_markdown,
    machine_facts,
    markdown_table,
    peak_rss_mb,
    quiet_tensorflow,
    replace_section,
)
from few_labels_data import (
    ALL_PER_CLASS,
    DATASETS,
    DEFAULT_DATA_ROOT,
    TEST_PER_CLASS,
    DatasetInfo,
    build_seed,
    digest,
    folder_source,
)

SCRIPT = str(Path(__file__).resolve())
SECTION = "few_labels"
DEFAULT_BUDGETS = ["4", "8", "16", "64", "all"]
VARIANTS = {
    "text": ("tfxfer", "tfxfer-hybrid", "keras-hub", "minilm-lr", "tfidf-lr", "hybrid-lr"),
    "image": ("tfxfer", "features-lr", "pixels-lr"),
}
# Run only when --variants names them (`benchmarks/lexical.py` does): issue 24's hybrid.
OPTIONAL_VARIANTS = ("tfxfer-hybrid", "hybrid-lr")
# The lexical hybrid: MiniLM-L6 and TF-IDF fused under one head (`--backbone minilm-l6,tfidf`).
HYBRID_BACKBONE = "minilm-l6,tfidf"
# The variant whose targets are checked; `--subject` (lexical.py: the hybrid).
SUBJECT = "tfxfer"
NAMES = {
    "tfxfer": "tfxfer default",
    "tfxfer-hybrid": "tfxfer hybrid (minilm-l6,tfidf)",
    "hybrid-lr": "MiniLM and TF-IDF + LR",
    "keras-hub": "keras-hub fit",
    "minilm-lr": "MiniLM + LR",
    "tfidf-lr": "TF-IDF + LR",
    "features-lr": "frozen random features + LR",
    "pixels-lr": "pixels + LR",
}
LR_MAX_ITER = 2000
MARGIN_MEAN, MARGIN_SEED = 2.0, 1.0  # target (1), points
KERAS_HUB_MARGIN, KERAS_HUB_BUDGET = 10.0, "8"  # target (2)
ABOVE_CHANCE = 20.0  # target (3), points above chance


# === Children (one measurement each, in a fresh process) ===


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _accuracy(truth, predicted) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "test_accuracy": float(accuracy_score(truth, predicted)),
        "test_macro_f1": float(f1_score(truth, predicted, average="macro")),
    }


def _logistic_regression(seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=LR_MAX_ITER, random_state=seed)


def _recipe_result(result: dict[str, Any]) -> dict[str, Any]:
    """What a tfxfer recipe run scored, and how it ended (which model LP-FT kept)."""
    test = result["metrics"]["test"]
    return {
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test.get("macro_f1"),
        "train_examples": len(result["data"].train),
        "val_examples": len(result["data"].val) if result["data"].val is not None else 0,
        "epochs": len(result["history"]) if result.get("history") is not None else None,
        "kept": (result["metrics"].get("selection") or {}).get("kept"),
        "selection": result["metrics"].get("selection"),
        "found_learning_rates": _found_learning_rates(result["run_dir"]),
    }


def _found_learning_rates(run_dir: str) -> dict[str, float]:
    """The rates `learning_rate="auto"` stages found, by stage (stages.json)."""
    path = Path(run_dir) / "stages.json"
    if not path.exists():
        return {}
    stages = json.loads(path.read_text(encoding="utf-8"))
    return {
        name: info["found_learning_rate"]
        for name, info in stages.items()
        if isinstance(info, dict) and info.get("found_learning_rate") is not None
    }


def child_tfxfer_text(spec: dict[str, Any]) -> dict[str, Any]:
    from recipes.bert_text_classifier import Config, main

    with tempfile.TemporaryDirectory(prefix="tfxfer-few-") as tmp:
        config = Config(
            train=spec["train"],
            test=spec["test"],
            text_column="text",
            label_column="label",
            output_dir=os.path.join(tmp, "run"),
            export=False,
            verbose=0,
            quiet=True,
            seed=spec["seed"],
            **spec.get("options", {}),
        )
        return _recipe_result(main(config))


def child_tfxfer_image(spec: dict[str, Any]) -> dict[str, Any]:
    from recipes.resnet50_image_classifier import Config, main

    with tempfile.TemporaryDirectory(prefix="tfxfer-few-") as tmp:
        config = Config(
            data_dir=spec["train"],
            test_dir=spec["test"],
            output_dir=os.path.join(tmp, "run"),
            export=False,
            verbose=0,
            quiet=True,
            seed=spec["seed"],
            **spec["image"],
            **spec.get("options", {}),
        )
        return _recipe_result(main(config))


def child_rank(spec: dict[str, Any]) -> dict[str, Any]:
    """`tfxfer.rank_backbones` on the split, as `benchmarks/rank.py` asks (nothing written)."""
    import tfxfer

    if spec["kind"] == "image":
        recipe = "resnet50_image_classifier"
        settings = [f"data_dir={spec['train']}", f"image_size={spec['image']['image_size']}"]
    else:
        recipe = "bert_text_classifier"
        settings = [f"train={spec['train']}", "text_column=text", "label_column=label"]
    ranking = tfxfer.rank_backbones(
        recipe,
        spec["candidates"],
        settings=[*settings, f"seed={spec['seed']}"],
        metric=spec.get("metric", "logme"),
        write=False,
    )
    return {"ranking": ranking}


def child_tfxfer_hybrid(spec: dict[str, Any]) -> dict[str, Any]:
    options = {**spec.get("options", {}), "backbone": HYBRID_BACKBONE}
    return child_tfxfer_text({**spec, "options": options})


def child_hybrid_lr(spec: dict[str, Any]) -> dict[str, Any]:
    """Frozen MiniLM mean-pooled features (L2-normalised, times 0.5) beside scikit-learn's
    TF-IDF (1-2-grams, sublinear tf) + `LogisticRegression`: issue 24's side-by-side row."""
    import numpy as np
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    minilm = _minilm_features(spec)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    data = minilm["data"]

    def side_by_side(dense, texts, fit):
        unit = dense / np.maximum(np.linalg.norm(dense, axis=1, keepdims=True), 1e-12)
        lexical = vectorizer.fit_transform(texts) if fit else vectorizer.transform(texts)
        return hstack([csr_matrix(0.5 * unit), lexical]).tocsr()

    classifier = _logistic_regression(spec["seed"])
    classifier.fit(side_by_side(minilm["train"], data.train.inputs, True), data.train.labels)
    predicted = classifier.predict(side_by_side(minilm["test"], data.test.inputs, False))
    return {**_accuracy(data.test.labels, predicted), "train_examples": len(data.train)}


def child_keras_hub(spec: dict[str, Any]) -> dict[str, Any]:
    from real_text import child_keras_hub as measure

    return measure(spec)


def child_minilm_lr(spec: dict[str, Any]) -> dict[str, Any]:
    minilm = _minilm_features(spec)
    data = minilm["data"]
    classifier = _logistic_regression(spec["seed"])
    classifier.fit(minilm["train"], data.train.labels)
    predicted = classifier.predict(minilm["test"])
    return {**_accuracy(data.test.labels, predicted), "train_examples": len(data.train)}


def _minilm_features(spec: dict[str, Any]) -> dict[str, Any]:
    """The split's data and frozen MiniLM-L6 masked-mean features of its train and test texts."""
    import numpy as np
    import tensorflow as tf
    from real_text import FEATURE_SEQUENCE_LENGTH, _load

    import tfxfer

    data = _load(spec)
    backbone = tfxfer.build_backbone("minilm-l6", sequence_length=FEATURE_SEQUENCE_LENGTH)

    def mean_features(texts: list[str]) -> np.ndarray:
        batches = tf.data.Dataset.from_tensor_slices(texts).batch(32).map(backbone.preprocessor)
        out = backbone.network.predict(batches, verbose=0)
        mask = np.asarray(out["padding_mask"], dtype="float32")[..., None]
        return (out["sequence_output"] * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)

    return {
        "data": data,
        "train": mean_features(data.train.inputs),
        "test": mean_features(data.test.inputs),
    }


def _read_csv(path: str) -> tuple[list[str], list[str]]:
    import csv

    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def child_tfidf_lr(spec: dict[str, Any]) -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    train_x, train_y = _read_csv(spec["train"])
    test_x, test_y = _read_csv(spec["test"])
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    classifier = _logistic_regression(spec["seed"])
    classifier.fit(vectorizer.fit_transform(train_x), train_y)
    predicted = classifier.predict(vectorizer.transform(test_x))
    return {
        **_accuracy(test_y, predicted),
        "train_examples": len(train_x),
        "vocabulary": len(vectorizer.vocabulary_),
    }


def _image_files(folder: str) -> tuple[list[str], list[str]]:
    base = Path(folder)
    files = sorted(p for p in base.rglob("*.png"))
    return [str(p) for p in files], [p.relative_to(base).parts[0] for p in files]


def child_pixels_lr(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from PIL import Image
    from sklearn.preprocessing import StandardScaler

    size = spec["image"]["image_size"]

    def pixels(paths: list[str]) -> np.ndarray:
        rows = []
        for path in paths:
            with Image.open(path) as image:
                image = image.convert("RGB").resize((size, size), Image.BILINEAR)
                rows.append(np.asarray(image, dtype=np.float32).reshape(-1))
        return np.stack(rows)

    train_paths, train_y = _image_files(spec["train"])
    test_paths, test_y = _image_files(spec["test"])
    scaler = StandardScaler()
    classifier = _logistic_regression(spec["seed"])
    classifier.fit(scaler.fit_transform(pixels(train_paths)), train_y)
    predicted = classifier.predict(scaler.transform(pixels(test_paths)))
    return {**_accuracy(test_y, predicted), "train_examples": len(train_paths)}


def child_features_lr(spec: dict[str, Any]) -> dict[str, Any]:
    import keras
    import numpy as np
    import tensorflow as tf
    from sklearn.preprocessing import StandardScaler

    import tfxfer
    from tfxfer.data.images import decode_and_resize

    image = spec["image"]
    keras.utils.set_random_seed(spec["seed"])
    backbone = tfxfer.build_backbone(
        image["backbone"], weights=image["weights"], image_size=image["image_size"]
    )

    def features(paths: list[str]) -> np.ndarray:
        ds = tf.data.Dataset.from_tensor_slices(paths).map(
            lambda p: decode_and_resize(p, image["image_size"])
        )
        out = []
        for batch in ds.batch(64):
            maps = backbone.network(backbone.preprocessor(batch), training=False)
            out.append(np.asarray(keras.ops.mean(maps, axis=(1, 2)), dtype=np.float64))
        return np.concatenate(out)

    train_paths, train_y = _image_files(spec["train"])
    test_paths, test_y = _image_files(spec["test"])
    train_x = features(train_paths)
    scaler = StandardScaler()
    classifier = _logistic_regression(spec["seed"])
    classifier.fit(scaler.fit_transform(train_x), train_y)
    predicted = classifier.predict(scaler.transform(features(test_paths)))
    return {
        **_accuracy(test_y, predicted),
        "train_examples": len(train_paths),
        "feature_scale": float(np.abs(train_x).mean()),
    }


CHILDREN = {
    ("text", "tfxfer"): child_tfxfer_text,
    ("text", "tfxfer-hybrid"): child_tfxfer_hybrid,
    ("text", "hybrid-lr"): child_hybrid_lr,
    ("text", "keras-hub"): child_keras_hub,
    ("text", "minilm-lr"): child_minilm_lr,
    ("text", "tfidf-lr"): child_tfidf_lr,
    ("image", "tfxfer"): child_tfxfer_image,
    ("image", "rank"): child_rank,
    ("text", "rank"): child_rank,
    ("image", "pixels-lr"): child_pixels_lr,
    ("image", "features-lr"): child_features_lr,
}


def child(spec: dict[str, Any]) -> None:
    quiet_tensorflow()
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    result = CHILDREN[(spec["kind"], spec["variant"])](spec)
    for key in ("wall_s", "cpu_s"):  # real_text's keras-hub child times from_preset..predict
        if key in result:
            result[f"inner_{key}"] = result.pop(key)
    result.update(
        measured_wall_s=time.perf_counter() - started,
        measured_cpu_s=_cpu_seconds() - cpu_started,
        peak_rss_mb=peak_rss_mb(),
        load_average=os.getloadavg()[0],
    )
    emit_result(result)


# === Running a child: whole-process wall and CPU time, bounded ===


def run_measured(spec: dict[str, Any], label: str, timeout: float) -> dict[str, Any]:
    """Runs `few_labels.py --child SPEC`; its RESULT plus whole-process wall and CPU time.

    A child that fails or outlives `timeout` seconds (its process group is then killed)
    gives `{"error": ...}` instead of raising, so one crash does not end a long run.
    """
    command = [sys.executable, SCRIPT, "--child", json.dumps(spec)]
    print(f"  -> {label} ...", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    timed_out = threading.Event()
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=child_environment(),
            cwd=str(Path(SCRIPT).parents[1]),
            start_new_session=True,  # its own process group, so a timeout ends all of it
        )

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        result = None
        try:
            for line in process.stdout:
                line = line.rstrip("\n")
                if line.startswith(RESULT_PREFIX):
                    result = json.loads(line[len(RESULT_PREFIX) :])
                elif line.strip() and not _NOISE.match(line):
                    print(f"     {line}", flush=True)
            code = process.wait()
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if code != 0 or result is None:
            stderr.seek(0)
            tail = [x for x in stderr.read().splitlines() if not _NOISE.match(x)][-40:]
            why = f"timed out after {timeout:.0f} s" if timed_out.is_set() else f"exit code {code}"
            print(f"     FAILED ({why}); last lines of its stderr:", flush=True)
            for x in tail:
                print(f"       {x}", flush=True)
            return {"error": why, "stderr_tail": tail, "wall_s": wall, "cpu_s": cpu}
    scored = (
        f"test accuracy {100 * result['test_accuracy']:.1f}%; " if "test_accuracy" in result else ""
    )
    print(f"     {scored}whole process {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return {**result, "wall_s": wall, "cpu_s": cpu}


# === Parent ===


def _datasets(args) -> dict[str, DatasetInfo]:
    known = dict(DATASETS)
    for item in args.image_sets:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"Expected --image-sets NAME=DIR. Received: {item!r}")
        known[name] = DatasetInfo("image", f"image folder {folder}", folder_source(folder))
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    names += [i.partition("=")[0] for i in args.image_sets if i.partition("=")[0] not in names]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"Expected --datasets from {sorted(known)}. Received: {args.datasets!r}")
    return {n: known[n] for n in names}


def _budgets(values: list[str]) -> list[str]:
    for value in values:
        if value != "all" and not (value.isdigit() and int(value) > 0):
            raise SystemExit(
                f"Expected --budgets of positive integers or 'all'. Received: {value!r}"
            )
    return values


def build_all(args) -> dict[tuple[str, int], dict[str, Any]]:
    root = Path(args.data_root).expanduser()
    manifests, cache = {}, {}
    for name, info in _datasets(args).items():
        for seed in args.seeds:
            manifest = build_seed(
                root,
                name,
                info,
                seed,
                _budgets(args.budgets),
                test_per_class=args.test_per_class,
                all_cap=args.all_per_class,
                source_cache=cache,
            )
            manifests[(name, seed)] = manifest
            print(
                f"[few_labels] {name} seed {seed}: {len(manifest['class_names'])} classes, "
                f"{args.test_per_class} test per class, 'all' = {manifest['all_per_class']} per "
                f"class; pool per class {manifest['pool_per_class']} ({manifest['paths']['test']})",
                flush=True,
            )
        cache.pop(name, None)  # Fashion-MNIST's 70,000 arrays need not stay in memory
    return manifests


def parent(args) -> int:
    started = time.perf_counter()
    facts = machine_facts()
    datasets = _datasets(args)
    budgets = _budgets(args.budgets)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    every = {v for vs in VARIANTS.values() for v in vs}
    if not wanted or any(v not in every for v in wanted):
        raise SystemExit(f"Expected --variants from {sorted(every)}. Received: {args.variants!r}")
    image = {"backbone": args.image_backbone, "weights": args.image_weights}
    image["image_size"] = args.image_size
    manifests = build_all(args)
    runs: list[dict[str, Any]] = []
    for name, info in datasets.items():
        variants = [v for v in VARIANTS[info.kind] if v in wanted]
        for i, seed in enumerate(args.seeds):
            manifest = manifests[(name, seed)]
            order = variants if i % 2 == 0 else variants[::-1]
            for budget in budgets:
                train = manifest["paths"][budget]
                per_class = manifest["all_per_class"] if budget == "all" else int(budget)
                for variant in order:
                    spec = {
                        "kind": info.kind,
                        "variant": variant,
                        "seed": seed,
                        "train": train,
                        "test": manifest["paths"]["test"],
                        "image": image,
                    }
                    label = f"{name}, {budget}/class, seed {seed}: {variant}"
                    result = run_measured(spec, label, args.child_timeout)
                    runs.append(
                        {
                            "dataset": name,
                            "kind": info.kind,
                            "budget": budget,
                            "per_class": per_class,
                            "seed": seed,
                            "variant": variant,
                            "order": ",".join(order),
                            "train_digest": digest(train),
                            **result,
                        }
                    )
                    if args.save_json:  # kept up to date, so an interrupted run keeps its data
                        Path(args.save_json).write_text(json.dumps(runs, indent=1), "utf-8")
    wall = time.perf_counter() - started
    body, all_met = results_section(runs, datasets, manifests, args)
    print("\n" + body + "\n", flush=True)
    if not args.no_readme:
        replace_section(args.section, facts_markdown(facts, wall) + "\n\n" + body)
    return 0 if all_met else 1


# === Tables and targets ===


def _accs(runs, dataset, budget, variant) -> dict[int, float]:
    return {
        r["seed"]: 100 * r["test_accuracy"]
        for r in runs
        if r["dataset"] == dataset
        and r["budget"] == budget
        and r["variant"] == variant
        and "error" not in r
    }


def _times(runs, dataset, budget, variant, key) -> list[float]:
    return [
        r[key]
        for r in runs
        if r["dataset"] == dataset
        and r["budget"] == budget
        and r["variant"] == variant
        and "error" not in r
    ]


def _cell(values: list[float], failed: int = 0) -> str:
    if not values:
        return "failed" if failed else "-"
    text = (
        f"{values[0]:.1f}%"
        if len(values) == 1
        else f"{statistics.mean(values):.1f}% ({min(values):.1f}-{max(values):.1f})"
    )
    return text + (f", {failed} failed" if failed else "")


def _seconds(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def results_section(runs, datasets, manifests, args) -> tuple[str, bool]:
    parts = [
        f"- seeds {args.seeds}; budgets {args.budgets} labels per class; test: "
        f"{args.test_per_class} per class, drawn per seed; 'all' = every labelled example the "
        f"smallest class has left, capped at {args.all_per_class}; image variants: "
        f"{args.image_backbone}, weights {args.image_weights}, {args.image_size} px",
        "- cells: test accuracy, mean (min-max) over seeds; times: whole child process, median "
        "(min-max) over seeds, in seconds",
    ]
    all_met = True
    for name, info in datasets.items():
        variants = [v for v in VARIANTS[info.kind] if any(r["variant"] == v for r in runs)]
        if not any(r["dataset"] == name for r in runs):
            continue
        first = manifests[(name, args.seeds[0])]
        classes = len(first["class_names"])
        # The default's baselines are not tfxfer's other variants; the hybrid's are all others.
        baselines = [
            v
            for v in variants
            if v != SUBJECT and (SUBJECT != "tfxfer" or v not in OPTIONAL_VARIANTS)
        ]
        timed = [v for v in variants if v in (SUBJECT, "tfxfer", "keras-hub")] or variants[:1]
        headers = ["labels per class", *[NAMES[v] for v in variants]]
        headers += [f"{NAMES[SUBJECT]} - best other (points: mean; per seed)"]
        headers += [f"{NAMES[v]} wall / CPU s" for v in timed]
        rows, checks = [], []
        for budget in args.budgets:
            per_class = first["all_per_class"] if budget == "all" else int(budget)
            row = [f"{budget} ({per_class * classes} examples)" if budget == "all" else budget]
            for v in variants:
                failed = sum(
                    1
                    for r in runs
                    if r["dataset"] == name
                    and r["budget"] == budget
                    and r["variant"] == v
                    and "error" in r
                )
                row.append(_cell(list(_accs(runs, name, budget, v).values()), failed))
            verdict, text = _target_one(runs, name, budget, baselines, len(args.seeds))
            row.append(text)
            for v in timed:
                row.append(
                    f"{_seconds(_times(runs, name, budget, v, 'wall_s'))} / "
                    f"{_seconds(_times(runs, name, budget, v, 'cpu_s'))}"
                )
            rows.append(row)
            if verdict is not None:
                checks.append(
                    (
                        f"(1) {budget}/class: {NAMES[SUBJECT]} >= best other + {MARGIN_MEAN:g} "
                        f"points, no seed below it by more than {MARGIN_SEED:g}",
                        verdict,
                        text,
                    )
                )
        if info.kind == "text" and KERAS_HUB_BUDGET in args.budgets and "keras-hub" in variants:
            checks.append(_target_two(runs, name))
        if info.kind == "image" and str(args.image_weights).lower() in ("none", "random"):
            chance = 100.0 / classes
            for budget in args.budgets:
                accs = list(_accs(runs, name, budget, "tfxfer").values())
                if not accs:
                    continue
                met = statistics.mean(accs) >= chance + ABOVE_CHANCE
                checks.append(
                    (
                        f"(3) {budget}/class: tfxfer from random weights >= chance "
                        f"({chance:.0f}%) + {ABOVE_CHANCE:g} points",
                        met,
                        f"mean {statistics.mean(accs):.1f}%, lowest seed {min(accs):.1f}%",
                    )
                )
        lines = [f"**{name}** ({info.description}; {classes} classes, chance {100 / classes:.1f}%)"]
        lines.append(markdown_table(headers, rows))
        lines.append(
            "Targets:" if checks else "Targets: none checked (tfxfer or a baseline not run)"
        )
        for title, met, text in checks:
            all_met &= bool(met)
            lines.append(f"- {title}: {'MET' if met else 'NOT MET'} ({text})")
        parts.append("\n\n".join(lines))
    orders = sorted({(r["seed"], r["kind"], r["order"]) for r in runs})
    parts.append(
        "Variant order per seed (alternating): "
        + "; ".join(f"seed {s} {k}: {o}" for s, k, o in orders)
    )
    failures = [r for r in runs if "error" in r]
    if failures:
        parts.append(
            "Failed runs: "
            + "; ".join(
                f"{r['dataset']} {r['budget']}/class seed {r['seed']} {r['variant']}: {r['error']}"
                + (f" ({r['stderr_tail'][-1]})" if r.get("stderr_tail") else "")
                for r in failures
            )
        )
    return "\n\n".join(parts), all_met


def _target_one(runs, name, budget, baselines, n_seeds) -> tuple[bool | None, str]:
    ours = _accs(runs, name, budget, SUBJECT)
    means = {
        v: statistics.mean(a.values()) for v in baselines if (a := _accs(runs, name, budget, v))
    }
    if not ours or not means:
        return None, "-"
    best = max(means, key=means.get)
    theirs = _accs(runs, name, budget, best)
    seeds = sorted(set(ours) & set(theirs))
    gaps = [ours[s] - theirs[s] for s in seeds]
    gap = statistics.mean(ours.values()) - means[best]
    complete = len(ours) == n_seeds and len(theirs) == n_seeds
    met = complete and gap >= MARGIN_MEAN and all(g >= -MARGIN_SEED for g in gaps)
    text = f"{gap:+.1f} vs {NAMES[best]}; " + ", ".join(f"{g:+.1f}" for g in gaps)
    return met, text


def _target_two(runs, name) -> tuple[str, bool, str]:
    budget = KERAS_HUB_BUDGET
    ours, theirs = _accs(runs, name, budget, SUBJECT), _accs(runs, name, budget, "keras-hub")
    title = (
        f"(2) {budget}/class: {NAMES[SUBJECT]} >= keras-hub + {KERAS_HUB_MARGIN:g} points in "
        "no more wall time"
    )
    if not ours or not theirs:
        return title, False, "a run failed"
    gap = statistics.mean(ours.values()) - statistics.mean(theirs.values())
    wall = {
        v: {
            r["seed"]: r["wall_s"]
            for r in runs
            if r["dataset"] == name
            and r["budget"] == budget
            and r["variant"] == v
            and "error" not in r
        }
        for v in (SUBJECT, "keras-hub")
    }
    ratios = [wall[SUBJECT][s] / wall["keras-hub"][s] for s in sorted(set(ours) & set(theirs))]
    faster = statistics.median(ratios) <= 1.0
    met = gap >= KERAS_HUB_MARGIN and faster
    text = (
        f"accuracy {gap:+.1f} points; whole-process wall tfxfer / keras-hub per seed "
        + ", ".join(f"{x:.2f}" for x in ratios)
    )
    return title, met, text


def add_split_arguments(parser) -> None:
    """The arguments of the scripts that run on these splits (`learning_rates.py`, `rank.py`)."""
    parser.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS)
    parser.add_argument("--all-per-class", type=int, default=ALL_PER_CLASS)
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    parser.add_argument("--image-sets", action="append", default=[])
    parser.add_argument("--child-timeout", type=float, default=1800)
    parser.add_argument("--save-json", default=None)
    parser.add_argument("--no-readme", action="store_true")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if argv[:1] == ["build"]:
        parser.prog = "few_labels.py build"
        argv = argv[1:]
    parser.add_argument(
        "--datasets",
        default=",".join(DATASETS),
        help=f"comma-separated, from {', '.join(DATASETS)} (and --image-sets names)",
    )
    parser.add_argument(
        "--image-sets",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an extra image set: a folder with one subfolder of images per class; repeatable",
    )
    parser.add_argument("--budgets", nargs="+", default=DEFAULT_BUDGETS, help="labels per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variants",
        default=",".join(
            dict.fromkeys(v for vs in VARIANTS.values() for v in vs if v not in OPTIONAL_VARIANTS)
        ),
        help="comma-separated; each dataset runs those of its kind",
    )
    parser.add_argument(
        "--subject",
        default="tfxfer",
        help="the variant whose targets are checked against all the others run beside it",
    )
    parser.add_argument(
        "--margin", type=float, default=2.0, help="points target (1) asks above the best"
    )
    parser.add_argument("--image-backbone", default="mobilenetv3small")
    parser.add_argument("--image-weights", default="none")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS)
    parser.add_argument("--all-per-class", type=int, default=ALL_PER_CLASS, help="cap of 'all'")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    parser.add_argument("--section", default=SECTION, help="the benchmarks/README.md section")
    parser.add_argument(
        "--child-timeout", type=float, default=1800, help="seconds before a child is killed"
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    globals().update(SUBJECT=args.subject, MARGIN_MEAN=args.margin)  # read by the report
    if parser.prog == "few_labels.py build":
        build_all(args)
        return 0
    return dispatch(args, child, parent)


if __name__ == "__main__":
    sys.exit(main())
