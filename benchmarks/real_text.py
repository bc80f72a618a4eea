"""Real text benchmark: Debian package descriptions, 8 archive sections, against baselines.

A harder test than the demo data: each text is a Debian package's synopsis and long
description, its label the package's archive section, among eight sections whose boundaries
are fuzzy even to Debian maintainers (admin, devel, graphics, mail, net, text, utils, web).
60 training and 50 test texts per class, drawn afresh for every seed. On that data it
measures, each in a fresh process:

  (a) `recipes.bert_text_classifier` with its defaults (pretrained MiniLM-L6);
  (b) keras-hub's `BertTextClassifier.from_preset(<MiniLM dir>)`, default compile, plain
      `fit` for 3 epochs at batch 16, 128 tokens;
  (c) frozen MiniLM-L6 features (tfxfer's backbone, 128 tokens, masked mean pooling) and
      scikit-learn's `LogisticRegression`.

Run from the repository root:

    .venv/bin/python benchmarks/real_text.py build --seed 0        # the data alone, seconds
    .venv/bin/python benchmarks/real_text.py --seeds 0 --no-readme  # one seed, ~7 min
    .venv/bin/python benchmarks/real_text.py                        # seeds 0 1 2, README
    .venv/bin/python benchmarks/real_text.py --variants a --recipe-set head_epochs=8 --no-readme

The data comes from Debian 12 (bookworm) `main`: `apt-get update` into a private lists folder
under the data root (the system's lists carry no long descriptions: Docker images set
`Acquire::Languages "none"`), then `apt-cache dumpavail` joined with `Translation-en`. The
same lists and seed give byte-identical files; pass `--refresh` to `build` to re-download.
Variant (c) needs scikit-learn: `pip install -e .[bench]`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from common import (
    add_common_arguments,
    dispatch,
    emit_result,
    facts_markdown,
    fmt_spread,
    machine_facts,
    markdown_table,
    peak_rss_mb,
    quiet_tensorflow,
    replace_section,
    run_child,
)

SCRIPT = str(Path(__file__).resolve())
SECTION = "real_text"
DEFAULT_DATA_ROOT = "~/.cache/tfxfer-benchmarks/debian-sections"
APT_SOURCE = (
    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
    "http://deb.debian.org/debian bookworm main"
)
# General-purpose tool and application sections with overlapping scopes (a network monitor
# could sit in admin, net or utils; a web mail client in mail or web). Left out: sections the
# package kind gives away (doc, libdevel, debug, fonts, localization, libs) and language
# sections (python, perl, ...), whose synopses say "Python 3 module" or "Perl module".
SECTIONS = ("admin", "devel", "graphics", "mail", "net", "text", "utils", "web")
TRAIN_PER_CLASS, TEST_PER_CLASS = 60, 50
MIN_CHARS, MAX_CHARS = 60, 1000
# Packages that exist to ship a sibling's files or to ease an upgrade; they repeat the text
# of the package they belong to.
FAMILY_SUFFIX = re.compile(r"-(dbg|dbgsym|dev|doc|docs|data|common|examples)$")
NOT_A_PROGRAM = re.compile(r"transitional|dummy package|metapackage", re.IGNORECASE)
KERAS_HUB_SETTINGS = {"sequence_length": 128, "epochs": 3, "batch_size": 16}
FEATURE_SEQUENCE_LENGTH = 128
NAMES = {
    "a": "(a) tfxfer text recipe (`recipes.bert_text_classifier`)",
    "b": "(b) keras-hub BertTextClassifier, default compile, fit 3 epochs",
    "c": "(c) frozen MiniLM mean features + LogisticRegression",
}


# === Data: Debian package descriptions by section ===


def _apt_options(apt_dir: Path) -> list[str]:
    """apt settings that read and write only `apt_dir`, whatever the system's lists hold."""
    return [
        f"-oDir::State::Lists={apt_dir / 'lists'}",
        f"-oDir::Etc::SourceList={apt_dir / 'sources.list'}",
        "-oDir::Etc::SourceParts=/nonexistent",
        f"-oDir::Cache={apt_dir / 'cache'}",
        "-oDir::Cache::pkgcache=",
        "-oDir::Cache::srcpkgcache=",
        "-oDir::State::status=/dev/null",  # installed packages must not join the data
        "-oAcquire::Languages=en",
        "-oDebug::NoLocking=1",
    ]


def _list_file(apt_dir: Path, marker: str) -> Path | None:
    found = sorted((apt_dir / "lists").glob(f"*{marker}*"))
    return found[0] if found else None


def fetch_lists(apt_dir: Path, refresh: bool = False) -> None:
    """Runs `apt-get update` into `apt_dir` when its lists are absent (or `refresh`)."""
    if not refresh and _list_file(apt_dir, "_Packages") and _list_file(apt_dir, "Translation-en"):
        return
    (apt_dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt_dir / "cache").mkdir(exist_ok=True)
    (apt_dir / "sources.list").write_text(APT_SOURCE + "\n", encoding="utf-8")
    print(f"[real_text] apt-get update into {apt_dir}", flush=True)
    # As root apt would hand the download to the `_apt` user, who cannot write under ~root.
    sandbox = ["-oAPT::Sandbox::User=root"] if os.geteuid() == 0 else []
    subprocess.run(["apt-get", "update", *_apt_options(apt_dir), *sandbox], check=True)
    if not _list_file(apt_dir, "Translation-en"):
        raise RuntimeError(f"apt-get update left no Translation-en list in {apt_dir / 'lists'}.")


def parse_stanzas(text: str) -> list[dict[str, str]]:
    """deb822 stanzas: continuation lines (leading space) stay in their field, newline-joined."""
    stanzas = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if fields:
            stanzas.append(fields)
    return stanzas


def description_text(description: str) -> str:
    """Synopsis + long description on one line; " ." paragraph breaks become spaces."""
    synopsis, *body = description.split("\n")
    words = [line.strip() for line in body if line.strip() != "."]
    text = " ".join([synopsis, *words])
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS].rsplit(" ", 1)[0]
    return text


def read_packages(apt_dir: Path) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Every package of the lists with its section, source and full text; and the lists' digests."""
    options = _apt_options(apt_dir)
    packages = subprocess.run(
        ["apt-cache", *options, "dumpavail"], check=True, capture_output=True, text=True
    ).stdout
    translation = subprocess.run(
        ["/usr/lib/apt/apt-helper", "cat-file", str(_list_file(apt_dir, "Translation-en"))],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    long_descriptions = {
        t["Description-md5"]: t["Description-en"]
        for t in parse_stanzas(translation)
        if "Description-md5" in t and "Description-en" in t
    }
    records = []
    for stanza in parse_stanzas(packages):
        description = long_descriptions.get(stanza.get("Description-md5", ""))
        records.append(
            {
                "package": stanza["Package"],
                "source": stanza.get("Source", stanza["Package"]).split(" ")[0],
                "section": stanza.get("Section", "").rsplit("/", 1)[-1],
                "synopsis": stanza.get("Description", "").split("\n")[0],
                "text": description_text(description or stanza.get("Description", "")),
            }
        )
    release = _list_file(apt_dir, "InRelease")
    date = (
        re.search(r"^Date: (.*)$", release.read_text(encoding="utf-8"), re.M) if release else None
    )
    digests = {
        "release_date": date.group(1) if date else "?",
        "dumpavail_sha256": hashlib.sha256(packages.encode()).hexdigest()[:16],
        "translation_sha256": hashlib.sha256(translation.encode()).hexdigest()[:16],
    }
    return records, digests


def candidate_pool(records: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """Per section, one package per source package, no short texts, no near-duplicates."""
    by_source: dict[str, list[dict[str, str]]] = defaultdict(list)
    for record in records:
        if (
            record["section"] in SECTIONS
            and len(record["text"]) >= MIN_CHARS
            and not NOT_A_PROGRAM.search(record["synopsis"])
        ):
            by_source[record["source"]].append(record)
    # A source's binaries (foo, foo-data, libfoo-dev) share their text: keep one, so a family
    # never sits on both sides of the train/test line. Prefer the program over its parts.
    chosen = []
    for source, members in sorted(by_source.items()):
        members.sort(
            key=lambda r: (
                bool(FAMILY_SUFFIX.search(r["package"])),
                r["package"] != source,
                len(r["package"]),
                r["package"],
            )
        )
        chosen.append(members[0])
    # Across sources, templated families (aspell-*, *-tempest-plugin, rime-data-*) and forks
    # (netcat-openbsd/-traditional) repeat most of a text: keep the first by name.
    pool: dict[str, list[dict[str, str]]] = {section: [] for section in SECTIONS}
    for record in drop_near_duplicates(sorted(chosen, key=lambda r: r["package"])):
        pool[record["section"]].append(record)
    return pool


def drop_near_duplicates(
    records: list[dict[str, str]], containment: float = 0.5, common: int = 100
) -> list[dict[str, str]]:
    """Keeps a record unless most of its (or an earlier one's) word 3-grams are shared.

    Texts equal up to digits (foo2/foo3) always count as duplicates. 3-grams found in more
    than `common` texts ("this package contains") are boilerplate: they are left out of the
    lookup, which keeps it fast, but still count in the overlap of the candidates it finds.
    """
    shingles = []
    for record in records:
        words = re.findall(r"[a-z]+", record["text"].lower())
        shingles.append({" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))})
    frequency = Counter(x for s in shingles for x in s)
    index: dict[str, list[int]] = defaultdict(list)
    exact: set[str] = set()
    kept = []
    for i, (record, own) in enumerate(zip(records, shingles, strict=True)):
        key = re.sub(r"[\d.]+", "", record["text"].lower())
        hits = Counter(j for x in own if frequency[x] <= common for j in index[x])
        if key in exact or any(
            len(own & shingles[j]) >= containment * min(len(own), len(shingles[j]))
            for j, _ in hits.most_common(3)
        ):
            continue
        exact.add(key)
        kept.append(record)
        for x in own:
            if frequency[x] <= common:
                index[x].append(i)
    return kept


def _words(rows: list[dict[str, str]]) -> str:
    counts = sorted(len(r["text"].split()) for r in rows)
    p90 = counts[min(len(counts) - 1, int(0.9 * len(counts)))]
    return (
        f"mean {statistics.mean(counts):.0f}, median {statistics.median(counts):.0f}, "
        f"p90 {p90} whitespace words"
    )


def build(
    seed: int, data_root: Path, refresh: bool = False, train_per_class: int = TRAIN_PER_CLASS
) -> Path:
    """Writes `train.csv`, `test.csv` and `manifest.json` for one seed; returns their folder.

    The folder is `seed-N`, or `seed-N-trainK` for another number K of training texts per
    class (the test texts are then drawn with them, so they differ from `seed-N`'s).
    """
    apt_dir = data_root / "apt"
    fetch_lists(apt_dir, refresh)
    records, digests = read_packages(apt_dir)
    pool = candidate_pool(records)
    rng = random.Random(seed)
    train, test = [], []
    for section in SECTIONS:
        needed = train_per_class + TEST_PER_CLASS
        if len(pool[section]) < needed:
            raise RuntimeError(
                f"Section {section!r} has {len(pool[section])} usable packages; expected at "
                f"least {needed}."
            )
        drawn = rng.sample(pool[section], needed)
        train += [{**r, "label": section} for r in drawn[:train_per_class]]
        test += [{**r, "label": section} for r in drawn[train_per_class:]]
    rng.shuffle(train)
    rng.shuffle(test)
    out = data_root / (
        f"seed-{seed}"
        if train_per_class == TRAIN_PER_CLASS
        else f"seed-{seed}-train{train_per_class}"
    )
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(out / f"{name}.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["text", "label"])
            writer.writerows([r["text"], r["label"]] for r in rows)
    manifest = {
        **digests,
        "apt_source": APT_SOURCE,
        "seed": seed,
        "pool_sizes": {s: len(pool[s]) for s in SECTIONS},
        "train_packages": [r["package"] for r in train],
        "test_packages": [r["package"] for r in test],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(
        f"[real_text] {len(records)} packages in the lists (released {digests['release_date']});"
        f" usable per section: {manifest['pool_sizes']}",
        flush=True,
    )
    for name, rows in (("train", train), ("test", test)):
        counts = Counter(r["label"] for r in rows)
        print(f"  {name}: {len(rows)} texts {dict(sorted(counts.items()))}; {_words(rows)}")
    print(f"[real_text] wrote {out}/train.csv, test.csv, manifest.json ({_data_digest(out)})")
    return out


def _data_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("train.csv", "test.csv"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:12]


# === Children (one measurement each, in a fresh process) ===


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load(spec: dict[str, Any]):
    """The train and test files as tfxfer reads them: class ids follow the sorted names."""
    from tfxfer.data.text import load_texts

    return load_texts(spec["train"], test=spec["test"], val_split=0.0)


def _scores(labels, probabilities, class_names) -> dict[str, float]:
    from tfxfer.report import classification_metrics

    metrics = classification_metrics(labels, probabilities, class_names)
    return {"test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"]}


def child_recipe(spec: dict[str, Any]) -> dict[str, Any]:
    from recipes.bert_text_classifier import Config, main
    from tfxfer.recipe import runner as recipe

    # Wrapping run_schedule (called by module attribute) times the training stages alone.
    timing: dict[str, float] = {}
    run_schedule = recipe.run_schedule

    def timed_run_schedule(*args, **kwargs):
        started = time.perf_counter()
        try:
            return run_schedule(*args, **kwargs)
        finally:
            timing["train_s"] = time.perf_counter() - started

    recipe.run_schedule = timed_run_schedule
    with tempfile.TemporaryDirectory(prefix="tfxfer-bench-") as tmp:
        fields = dict(train=spec["train"], test=spec["test"], output_dir=os.path.join(tmp, "run"))
        fields.update(export=False, verbose=0, seed=spec["seed"], **spec["recipe_set"])
        try:
            config = Config(**fields)
        except TypeError as error:
            raise SystemExit(f"--recipe-set names a field Config does not have: {error}") from None
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        result = main(config)
        wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    test = result["metrics"]["test"]
    settings = ("sequence_length", "batch_size", "head_epochs", "finetune_epochs", "pooling")
    return {
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "wall_s": wall,
        "cpu_s": cpu,
        "train_s": timing.get("train_s"),
        "train_examples": len(result["data"].train),
        "settings": {k: getattr(config, k) for k in settings} | spec["recipe_set"],
        # Stages whose learning rate was "auto": the rate the range test found.
        "found_learning_rates": {
            name: info["found_learning_rate"]
            for name, info in result["result"].stages.items()
            if "found_learning_rate" in info
        },
    }


def child_keras_hub(spec: dict[str, Any]) -> dict[str, Any]:
    import keras
    import keras_hub
    import numpy as np
    from text_quality import _minilm_dir

    data = _load(spec)
    keras.utils.set_random_seed(spec["seed"])
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    classifier = keras_hub.models.BertTextClassifier.from_preset(
        str(_minilm_dir()), num_classes=len(data.class_names)
    )
    classifier.preprocessor.sequence_length = KERAS_HUB_SETTINGS["sequence_length"]
    fit_started = time.perf_counter()
    classifier.fit(
        x=np.array(data.train.inputs),
        y=data.train.labels,
        epochs=KERAS_HUB_SETTINGS["epochs"],
        batch_size=KERAS_HUB_SETTINGS["batch_size"],
        verbose=0,
    )
    fit_s = time.perf_counter() - fit_started
    logits = classifier.predict(np.array(data.test.inputs), verbose=0)
    wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
    return {
        **_scores(data.test.labels, probabilities, data.class_names),
        "wall_s": wall,
        "cpu_s": cpu,
        "train_s": fit_s,
        "train_examples": len(data.train),
        "settings": dict(KERAS_HUB_SETTINGS),
    }


def child_features(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise SystemExit(
            "Variant (c) needs scikit-learn, which is not installed. Install the benchmark "
            "extras: pip install -e .[bench]"
        ) from None
    import numpy as np
    import tensorflow as tf

    import tfxfer

    data = _load(spec)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    backbone = tfxfer.build_backbone("minilm-l6", sequence_length=FEATURE_SEQUENCE_LENGTH)

    def mean_features(texts: list[str]) -> tuple[np.ndarray, float]:
        batches = tf.data.Dataset.from_tensor_slices(texts).batch(32).map(backbone.preprocessor)
        out = backbone.network.predict(batches, verbose=0)
        mask = np.asarray(out["padding_mask"], dtype="float32")[..., None]
        pooled = (out["sequence_output"] * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)
        return pooled, float(mask[:, -1, 0].mean())  # share of texts that filled every token

    train_x, truncated = mean_features(data.train.inputs)
    test_x, _ = mean_features(data.test.inputs)
    fit_started = time.perf_counter()
    classifier = LogisticRegression(max_iter=1000, random_state=spec["seed"])
    classifier.fit(train_x, data.train.labels)
    fit_s = time.perf_counter() - fit_started
    probabilities = classifier.predict_proba(test_x)
    wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    return {
        **_scores(data.test.labels, probabilities, data.class_names),
        "wall_s": wall,
        "cpu_s": cpu,
        "train_s": fit_s,
        "train_examples": len(data.train),
        "truncated_share": truncated,
        "settings": {"sequence_length": FEATURE_SEQUENCE_LENGTH, "max_iter": 1000},
    }


def child(spec: dict[str, Any]) -> None:
    quiet_tensorflow()
    measure = {"a": child_recipe, "b": child_keras_hub, "c": child_features}[spec["variant"]]
    result = measure(spec)
    result.update(peak_rss_mb=peak_rss_mb(), load_average=os.getloadavg()[0])
    emit_result(result)


# === Parent: data, children, tables ===


def _mean_range(values: list[float], suffix: str = "%") -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}{suffix}"
    return f"{statistics.mean(values):.1f}{suffix} ({min(values):.1f}-{max(values):.1f})"


def _settings(key: str, result: dict[str, Any]) -> str:
    s = result["settings"]
    if key == "a":
        fields = ", ".join(f"{k}={v}" for k, v in s.items())
        return f"{fields}; trains on {result['train_examples']}, validates on the rest"
    if key == "b":
        return (
            f"keras-hub's compile (Adam 5e-5), {s['epochs']} epochs, batch {s['batch_size']}, "
            f"{s['sequence_length']} tokens"
        )
    share = 100 * result["truncated_share"]
    return f"{s['sequence_length']} tokens ({share:.0f}% of train texts fill them), max_iter 1000"


def results_section(runs: dict[str, list[dict[str, Any]]], seeds: list[int]) -> str:
    keys = [k for k in NAMES if runs.get(k)]
    main_table = markdown_table(
        [
            "variant",
            "settings",
            "test accuracy, mean (range)",
            "test macro F1",
            "wall time",
            "of which training",
            "CPU time",
            "peak RSS",
        ],
        [
            [
                NAMES[k],
                _settings(k, runs[k][0]),
                _mean_range([100 * r["test_accuracy"] for r in runs[k]]),
                _mean_range([100 * r["test_macro_f1"] for r in runs[k]]),
                fmt_spread([r["wall_s"] for r in runs[k]], 0, " s"),
                fmt_spread([r["train_s"] for r in runs[k] if r["train_s"] is not None], 0, " s"),
                fmt_spread([r["cpu_s"] for r in runs[k]], 0, " s"),
                fmt_spread([r["peak_rss_mb"] for r in runs[k]], 0, " MiB"),
            ]
            for k in keys
        ],
    )
    headers = ["seed", "order", *[f"{k} test acc." for k in keys]]
    pairs = [("a", "b"), ("a", "c")]
    pairs = [(x, y) for x, y in pairs if x in keys and y in keys]
    headers += [f"({x})-({y}) points" for x, y in pairs]
    if ("a", "b") in pairs:
        headers += ["(a)/(b) wall", "(a)/(b) CPU"]
    headers.append("load average")
    rows = []
    for i, seed in enumerate(seeds):
        row = [seed, ",".join(keys if i % 2 == 0 else keys[::-1])]
        row += [f"{100 * runs[k][i]['test_accuracy']:.1f}%" for k in keys]
        row += [
            f"{100 * (runs[x][i]['test_accuracy'] - runs[y][i]['test_accuracy']):+.1f}"
            for x, y in pairs
        ]
        if ("a", "b") in pairs:
            a, b = runs["a"][i], runs["b"][i]
            row += [f"{a['wall_s'] / b['wall_s']:.2f}", f"{a['cpu_s'] / b['cpu_s']:.2f}"]
        row.append(", ".join(f"{runs[k][i]['load_average']:.1f}" for k in keys))
        rows.append(row)
    return "\n\n".join(
        [
            main_table,
            "Per seed (variants run back to back in the order shown):",
            markdown_table(headers, rows),
        ]
    )


def parent(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    facts = machine_facts()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in NAMES]
    if unknown or not variants:
        raise SystemExit(f"Expected --variants from {sorted(NAMES)}. Received: {args.variants!r}")
    recipe_set = {}
    for item in args.recipe_set:
        field_name, sep, value = item.partition("=")
        if not sep or not field_name:
            raise SystemExit(f"Expected --recipe-set FIELD=VALUE. Received: {item!r}")
        try:
            recipe_set[field_name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            recipe_set[field_name.strip()] = value  # a plain string, e.g. pooling=cls
    data_root = Path(args.data_root).expanduser()
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    digests = []
    for i, seed in enumerate(args.seeds):
        folder = data_root / f"seed-{seed}"
        if not (folder / "train.csv").exists() or not (folder / "test.csv").exists():
            build(seed, data_root)
        digests.append(_data_digest(folder))
        print(f"[real_text] seed {seed}: data {folder} ({digests[-1]})", flush=True)
        for key in variants if i % 2 == 0 else variants[::-1]:
            spec = {
                "variant": key,
                "seed": seed,
                "train": str(folder / "train.csv"),
                "test": str(folder / "test.csv"),
                "recipe_set": recipe_set,
            }
            result = run_child(SCRIPT, spec, f"{NAMES[key]}, seed {seed}")
            print(
                f"     test accuracy {100 * result['test_accuracy']:.1f}%, wall "
                f"{result['wall_s']:.0f} s, CPU {result['cpu_s']:.0f} s",
                flush=True,
            )
            runs[key].append(result | {"seed": seed, "data_digest": digests[-1]})
    wall = time.perf_counter() - started
    body = results_section(runs, args.seeds)
    data_note = f"- data: {data_root}/seed-N, digests {', '.join(digests)}; " + (
        f"recipe overrides {json.dumps(recipe_set)}" if recipe_set else "recipe defaults"
    )
    print("\n" + body + "\n", flush=True)
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(runs, indent=1), encoding="utf-8")
    if not args.no_readme:
        replace_section(SECTION, facts_markdown(facts, wall) + "\n" + data_note + "\n\n" + body)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build"]:
        parser = argparse.ArgumentParser(prog="real_text.py build", description=build.__doc__)
        parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
        parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
        parser.add_argument("--refresh", action="store_true", help="re-download the apt lists")
        args = parser.parse_args(argv[1:])
        build(args.seed, Path(args.data_root).expanduser(), args.refresh)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", default="a,b,c", help="which of a,b,c to run")
    parser.add_argument(
        "--recipe-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a Config field for (a), value parsed as JSON else taken as a string; repeatable",
    )
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help="built data goes here")
    add_common_arguments(parser)
    return dispatch(parser.parse_args(argv), child, parent)


if __name__ == "__main__":
    sys.exit(main())
