"""The few-labels benchmark's datasets: real text and images, offline, cached, drawn per seed.

Four sets, each built from data nobody in this project wrote, each fetched with an ordinary
package client (apt) or shipped inside an installed package (scikit-learn):

  debian-sections  Debian 12 package descriptions labelled by archive section (8 sections),
                   `real_text.py`'s builder (apt lists into a private folder, one package per
                   source package, near-duplicates dropped).
  fortunes         the quotations and jokes of Debian's `fortunes` package (fortune-mod's
                   data files), labelled by the file their maintainers filed them in (8 topics:
                   computers, education, food, law, love, politics, science, sports).
  digits           scikit-learn's bundled `load_digits` (1,797 scans of handwritten digits,
                   8x8 grey levels, 10 classes), upsampled to 32x32 RGB PNG files.
  fashion-mnist    Zalando's Fashion-MNIST (photographs of 10 kinds of clothing, 28x28 grey
                   levels) from Debian's `dataset-fashion-mnist` package; labelled images come
                   from its training file, test images from its test file.

Any folder with one subfolder of images per class joins as an extra image set
(`--image-sets NAME=DIR` of `few_labels.py`).

Per (set, seed) the seed draws the test split (TEST_PER_CLASS per class) and an order of the
remaining labelled examples of each class; a budget of B labels per class takes the first B
of that order, so the budgets of one seed are nested (the 8 are among the 16) and share one
test split. "all" takes the first `all_per_class` of every class: every labelled example the
smallest class has left after the test draw, capped at ALL_PER_CLASS (Fashion-MNIST has 6,000
per class; the cap keeps a CPU run in minutes), so every budget is class-balanced.

Layout under the data root (default ~/.cache/tfxfer-benchmarks/few-labels):

  sources/                      downloaded .deb files and what they unpack to
  <set>/seed-N/manifest.json    what was drawn (ids), the source's digests, the settings
  <set>/seed-N/test.csv         text sets: columns text,label
  <set>/seed-N/train-B.csv      text sets: B per class (B = 4, 8, ..., or "all")
  <set>/seed-N/test/<class>/    image sets: PNG files
  <set>/seed-N/train-B/<class>/ image sets: PNG files (hard links into labelled/)
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DATA_ROOT = "~/.cache/tfxfer-benchmarks/few-labels"
TEST_PER_CLASS = 50
ALL_PER_CLASS = 256
DIGITS_SIZE = 32  # the side the 8x8 digits are upsampled to (the image variants' default size)
FORTUNE_TOPICS = ("computers", "education", "food", "law", "love", "politics", "science", "sports")
FORTUNE_MIN_CHARS, FORTUNE_MAX_CHARS = 20, 1000
FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)


@dataclass
class Source:
    """A set's labelled pool (and its own test pool, when it has an official test split).

    Items are `(id, payload)`: the text for text sets; a uint8 array (H, W) or (H, W, 3), or
    the path of an image file, for image sets.
    """

    kind: str  # "text" or "image"
    class_names: list[str]
    train: dict[str, list[tuple[str, Any]]]
    test: dict[str, list[tuple[str, Any]]] | None = None  # None: test is drawn from `train`
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetInfo:
    kind: str
    description: str
    load: Callable[[Path], Source]


# === Sources ===


def _apt(root: Path):
    """real_text's private apt folder (shared, so the lists are fetched once) and its options."""
    import real_text

    apt_dir = Path(real_text.DEFAULT_DATA_ROOT).expanduser() / "apt"
    real_text.fetch_lists(apt_dir)
    options = real_text._apt_options(apt_dir)
    if os.geteuid() == 0:
        options.append("-oAPT::Sandbox::User=root")
    return apt_dir, options


def debian_package(root: Path, package: str) -> tuple[Path, dict[str, str]]:
    """Downloads `package`'s .deb with `apt-get download` (private lists) and unpacks it once.

    Returns the folder it unpacked to and its version and digest.
    """
    target = root / "sources" / package
    stamp = target / "source.json"
    if stamp.exists():
        return target / "root", json.loads(stamp.read_text(encoding="utf-8"))
    _, options = _apt(root)
    download = target / "download"
    shutil.rmtree(target, ignore_errors=True)
    download.mkdir(parents=True)
    print(f"[few_labels] apt-get download {package}", flush=True)
    subprocess.run(["apt-get", *options, "download", package], cwd=download, check=True)
    debs = sorted(download.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package} left no .deb in {download}.")
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(target / "root")], check=True)
    version = subprocess.run(
        ["dpkg-deb", "-f", str(debs[0]), "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    facts = {
        "package": package,
        "version": version,
        "deb_sha256": hashlib.sha256(debs[0].read_bytes()).hexdigest()[:16],
    }
    stamp.write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")
    return target / "root", facts


def load_debian_sections(root: Path) -> Source:
    import real_text

    apt_dir, _ = _apt(root)
    records, digests = real_text.read_packages(apt_dir)
    pool = real_text.candidate_pool(records)
    train = {s: [(r["package"], r["text"]) for r in pool[s]] for s in real_text.SECTIONS}
    return Source("text", list(real_text.SECTIONS), train, facts={**digests, "source": "apt"})


def _fortune_texts(path: Path) -> list[str]:
    """One fortune file's entries ('%' lines separate them), each on one line."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    texts = []
    for entry in re.split(r"^%$", raw, flags=re.M):
        text = re.sub(r"\s+", " ", entry).strip()
        if len(text) > FORTUNE_MAX_CHARS:
            text = text[:FORTUNE_MAX_CHARS].rsplit(" ", 1)[0]
        if len(text) >= FORTUNE_MIN_CHARS:
            texts.append(text)
    return texts


def load_fortunes(root: Path) -> Source:
    import real_text

    unpacked, facts = debian_package(root, "fortunes")
    folder = unpacked / "usr/share/games/fortunes"
    entries = {topic: _fortune_texts(folder / topic) for topic in FORTUNE_TOPICS}
    # A fortune filed under two topics has no single label; near-copies (the same joke twice,
    # reworded) must not sit on both sides of the train/test line.
    seen: dict[str, set[str]] = {}
    for topic, texts in entries.items():
        for text in texts:
            seen.setdefault(text.lower(), set()).add(topic)
    records = [
        {"text": text, "label": topic, "id": f"{topic}:{i}"}
        for topic, texts in entries.items()
        for i, text in enumerate(texts)
        if len(seen[text.lower()]) == 1
    ]
    kept = real_text.drop_near_duplicates(records)
    train: dict[str, list[tuple[str, Any]]] = {t: [] for t in FORTUNE_TOPICS}
    for record in kept:
        train[record["label"]].append((record["id"], record["text"]))
    facts = {**facts, "entries_per_topic": {t: len(v) for t, v in entries.items()}}
    return Source("text", list(FORTUNE_TOPICS), train, facts=facts)


def load_digits_source(root: Path) -> Source:
    import numpy as np
    import sklearn
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    train: dict[str, list[tuple[str, Any]]] = {str(d): [] for d in range(10)}
    for i, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        pixels = np.round(image * 255 / 16).astype(np.uint8)
        big = Image.fromarray(pixels).resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR)
        train[str(target)].append((f"{i:04d}", np.asarray(big)))
    digest = hashlib.sha256(digits.images.tobytes()).hexdigest()[:16]
    facts = {"source": f"scikit-learn {sklearn.__version__} load_digits", "sha256": digest}
    return Source("image", list(train), train, facts=facts)


def _idx(path: Path):
    """An IDX file (gzipped), as Fashion-MNIST ships it, as a numpy array."""
    import numpy as np

    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(root: Path) -> Source:
    unpacked, facts = debian_package(root, "dataset-fashion-mnist")
    folder = unpacked / "usr/share/datasets/fashion-mnist"
    pools = []
    for prefix in ("train", "t10k"):
        images = _idx(folder / f"{prefix}-images-idx3-ubyte.gz")
        labels = _idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
        pool: dict[str, list[tuple[str, Any]]] = {name: [] for name in FASHION_CLASSES}
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            pool[FASHION_CLASSES[label]].append((f"{prefix}-{i:05d}", image))
        pools.append(pool)
    return Source("image", list(FASHION_CLASSES), pools[0], pools[1], facts=facts)


def folder_source(directory: str) -> Callable[[Path], Source]:
    """An image set from a folder with one subfolder of images per class (`--image-sets`)."""

    def load(root: Path) -> Source:
        base = Path(directory).expanduser()
        suffixes = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
        train = {
            folder.name: [
                (str(p.relative_to(base).with_suffix("")), str(p))
                for p in sorted(folder.rglob("*"))
                if p.suffix.lower() in suffixes
            ]
            for folder in sorted(base.iterdir())
            if folder.is_dir()
        }
        listing = "\n".join(i for items in train.values() for i, _ in items)
        files_digest = hashlib.sha256(listing.encode()).hexdigest()[:16]
        facts = {"folder": str(base), "files_sha256": files_digest}
        return Source("image", list(train), train, facts=facts)

    return load


DATASETS: dict[str, DatasetInfo] = {
    "debian-sections": DatasetInfo(
        "text",
        "Debian 12 package descriptions by archive section (8 classes), as real_text.py "
        "builds them",
        load_debian_sections,
    ),
    "fortunes": DatasetInfo(
        "text",
        "fortune-mod's quotations and jokes (Debian `fortunes`) by the file they are filed in "
        f"(8 topics: {', '.join(FORTUNE_TOPICS)})",
        load_fortunes,
    ),
    "digits": DatasetInfo(
        "image",
        f"scikit-learn's digits (1,797 8x8 scans, 10 classes), upsampled to {DIGITS_SIZE}x"
        f"{DIGITS_SIZE} RGB PNG",
        load_digits_source,
    ),
    "fashion-mnist": DatasetInfo(
        "image",
        "Fashion-MNIST (Debian `dataset-fashion-mnist`: 28x28 grey photographs of 10 kinds of "
        "clothing; labelled from its train file, test from its t10k file)",
        load_fashion_mnist,
    ),
}


# === Draws per seed ===


def _settings(test_per_class: int, all_cap: int) -> dict[str, int]:
    return {"test_per_class": test_per_class, "all_cap": all_cap, "layout": 1}


def seed_folder(root: Path, name: str, seed: int) -> Path:
    return root / name / f"seed-{seed}"


def build_seed(
    root: Path,
    name: str,
    info: DatasetInfo,
    seed: int,
    budgets: list[str],
    *,
    test_per_class: int = TEST_PER_CLASS,
    all_cap: int = ALL_PER_CLASS,
    source_cache: dict[str, Source] | None = None,
) -> dict[str, Any]:
    """Draws (or reuses) one seed's test split and labelled order; writes every budget asked.

    Returns the manifest (with "all_per_class", and "paths": budget -> train path, "test").
    """
    folder = seed_folder(root, name, seed)
    manifest_path = folder / "manifest.json"
    settings = _settings(test_per_class, all_cap)
    manifest = None
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("settings") != settings:
            manifest = None
    if manifest is None:
        cache = source_cache if source_cache is not None else {}
        if name not in cache:
            cache[name] = info.load(root)
        manifest = _draw(folder, name, cache[name], seed, settings)
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    paths = {"test": str(folder / ("test.csv" if info.kind == "text" else "test"))}
    for budget in budgets:
        per_class = manifest["all_per_class"] if budget == "all" else int(budget)
        if per_class > manifest["all_per_class"]:
            raise RuntimeError(
                f"{name}: a budget of {budget} per class is more than the "
                f"{manifest['all_per_class']} labelled examples per class the set has left after "
                "the test draw."
            )
        paths[budget] = str(_write_budget(folder, info.kind, budget, per_class))
    return {**manifest, "paths": paths}


def _draw(folder: Path, name: str, source: Source, seed: int, settings: dict) -> dict[str, Any]:
    rng = random.Random(f"{name}/{seed}")
    test_per_class, all_cap = settings["test_per_class"], settings["all_cap"]
    tests, orders = {}, {}
    for label in source.class_names:
        pool = source.train[label]
        test_pool = source.test[label] if source.test is not None else pool
        if len(test_pool) < test_per_class:
            raise RuntimeError(
                f"{name}: class {label!r} has {len(test_pool)} examples for the test split; "
                f"{test_per_class} are needed."
            )
        tests[label] = rng.sample(test_pool, test_per_class)
        taken = {i for i, _ in tests[label]} if source.test is None else set()
        rest = [item for item in pool if item[0] not in taken]
        orders[label] = rng.sample(rest, len(rest))
    all_per_class = min(all_cap, min(len(order) for order in orders.values()))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if source.kind == "text":
        test_rows = [(text, label) for label in source.class_names for _, text in tests[label]]
        rng.shuffle(test_rows)
        _write_csv(folder / "test.csv", test_rows)
        labelled = [
            (text, label, rank)
            for label in source.class_names
            for rank, (_, text) in enumerate(orders[label][:all_per_class])
        ]
        rng.shuffle(labelled)  # classes interleave in every budget's file
        with open(folder / "labelled.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["text", "label", "rank"])
            writer.writerows(labelled)
    else:
        for label in source.class_names:
            for item_id, payload in tests[label]:
                _write_image(folder / "test" / label / f"{_safe(item_id)}.png", payload)
            for rank, (item_id, payload) in enumerate(orders[label][:all_per_class]):
                _write_image(
                    folder / "labelled" / label / f"{rank:05d}-{_safe(item_id)}.png", payload
                )
    return {
        "dataset": name,
        "seed": seed,
        "settings": settings,
        "kind": source.kind,
        "class_names": source.class_names,
        "all_per_class": all_per_class,
        "pool_per_class": {label: len(source.train[label]) for label in source.class_names},
        "source": source.facts,
        "test_ids": {label: [i for i, _ in tests[label]] for label in source.class_names},
        "labelled_ids": {
            label: [i for i, _ in orders[label][:all_per_class]] for label in source.class_names
        },
    }


def _safe(item_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", item_id)


def _write_csv(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def _write_image(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(payload, str):
        from PIL import Image

        with Image.open(payload) as image:
            image.convert("RGB").save(path)
        return
    import numpy as np
    from PIL import Image

    array = np.asarray(payload, dtype=np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    Image.fromarray(array).save(path)


def _write_budget(folder: Path, kind: str, budget: str, per_class: int) -> Path:
    """The first `per_class` of each class's labelled order, as a CSV file or a folder."""
    if kind == "text":
        out = folder / f"train-{budget}.csv"
        if not out.exists():
            with open(folder / "labelled.csv", encoding="utf-8", newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["rank"]) < per_class]
            _write_csv(out, [(r["text"], r["label"]) for r in rows])
        return out
    out = folder / f"train-{budget}"
    if not out.is_dir():
        partial = folder / f".train-{budget}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        for class_dir in sorted((folder / "labelled").iterdir()):
            (partial / class_dir.name).mkdir(parents=True)
            for path in sorted(class_dir.iterdir())[:per_class]:
                try:
                    os.link(path, partial / class_dir.name / path.name)
                except OSError:
                    shutil.copy(path, partial / class_dir.name / path.name)
        partial.rename(out)
    return out


def digest(path: str) -> str:
    """A short digest of a budget's file or folder (names and bytes), for the record."""
    h = hashlib.sha256()
    p = Path(path)
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
    for f in files:
        h.update(str(f.relative_to(p.parent)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]
