"""Tests for the demo text dataset in `tfxfer.demo_data` and its generator script."""

from __future__ import annotations

import collections
import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tfxfer.demo_data import DEMO_CLASSES, demo_text_paths

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATOR = REPO_ROOT / "tools" / "make_demo_text.py"
EXPECTED_ROWS = {"train": 400, "test": 150}


def read_split(path: Path) -> list[dict[str, str]]:
    # Strict decoding: a byte that is not UTF-8 fails here rather than turning into U+FFFD.
    text = path.read_bytes().decode("utf-8", errors="strict")
    reader = csv.DictReader(text.splitlines())
    assert reader.fieldnames == ["text", "label"]
    return list(reader)


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict[str, str]]]:
    return {split: read_split(path) for split, path in demo_text_paths().items()}


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z][a-z'-]*", text.lower()))


def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9'-]+", text.lower()))


def test_paths_point_at_small_package_files():
    paths = demo_text_paths()
    assert set(paths) == {"train", "test"}
    for split, path in paths.items():
        assert path.is_file()
        assert path.name == f"{split}.csv"
        assert path.parent.name == "demo_data"
        assert path.stat().st_size < 100_000


def test_splits_are_balanced_over_the_classes(splits):
    for split, rows in splits.items():
        assert len(rows) == EXPECTED_ROWS[split]
        counts = collections.Counter(row["label"] for row in rows)
        assert sorted(counts) == list(DEMO_CLASSES)
        assert set(counts.values()) == {EXPECTED_ROWS[split] // len(DEMO_CLASSES)}


def test_texts_are_single_clean_sentences(splits):
    for rows in splits.values():
        for row in rows:
            text = row["text"]
            assert text == text.strip() and "\n" not in text
            assert 8 <= len(text.split()) <= 25, text
            assert text[0].isupper() and text[-1] in ".?!", text


def test_no_text_is_repeated_within_or_across_splits(splits):
    train = [row["text"] for row in splits["train"]]
    test = [row["text"] for row in splits["test"]]
    assert len(set(train)) == len(train)
    assert len(set(test)) == len(test)
    assert not set(train) & set(test)
    # Nor does case or punctuation make a sentence new.
    normalised_train = {normalise(text) for text in train}
    assert not any(normalise(text) in normalised_train for text in test)


def test_test_split_uses_wording_train_never_shows(splits):
    # The point of the split: a model that only memorised train words meets unknown words in
    # most test sentences of every class, but most words are still familiar English.
    train_vocabulary = set().union(*(words(row["text"]) for row in splits["train"]))
    with_new_words: collections.Counter[str] = collections.Counter()
    new_tokens: collections.Counter[str] = collections.Counter()
    all_tokens: collections.Counter[str] = collections.Counter()
    for row in splits["test"]:
        tokens = re.findall(r"[a-z][a-z'-]*", row["text"].lower())
        unseen = [token for token in tokens if token not in train_vocabulary]
        with_new_words[row["label"]] += bool(unseen)
        new_tokens[row["label"]] += len(unseen)
        all_tokens[row["label"]] += len(tokens)
    per_class = EXPECTED_ROWS["test"] // len(DEMO_CLASSES)
    for label in DEMO_CLASSES:
        assert with_new_words[label] / per_class >= 0.6, label
        assert 0.1 <= new_tokens[label] / all_tokens[label] <= 0.5, label


def test_generator_reproduces_the_committed_files(tmp_path):
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for split, committed in demo_text_paths().items():
        assert (tmp_path / f"{split}.csv").read_bytes() == committed.read_bytes(), (
            f"{split}.csv differs from the generator's output: regenerate it with "
            f"`python tools/make_demo_text.py` and commit both files."
        )
