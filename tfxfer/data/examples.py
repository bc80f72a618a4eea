"""One data model for labelled examples, whether they are image files or raw texts.

Loaders (`tfxfer.data.images.load_images`, `tfxfer.data.text.load_texts`) return the same
`LabelledData`: train, validation and test `Examples` with one list of class names. What
differs between images and text is only what an input is (a file path or a string) and how
`tfxfer.data.datasets.make_datasets` turns it into tensors; splitting, counting and reporting
are written once, here.

Each `Examples` also remembers what loading had to leave out: `skipped` lists what counts as
a problem worth a warning (corrupt images, empty texts) and `ignored` counts files of other
types in the folders (a README next to the photos is no problem). A validation split carved
out of the training set keeps those on the training part, so a run's `config.json` reports
them whether or not the data were split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tfxfer.data.pipeline import stratified_split
from tfxfer.errors import DataError

KINDS = ("image", "text")


@dataclass
class Examples:
    """Labelled examples of one split: image paths or raw texts, and their labels.

    Args:
        inputs: list[str]. Image file paths (kind `"image"`) or raw texts (kind `"text"`), in
            file order.
        labels: np.ndarray. `(n,)` int32 class ids, or `(n, num_classes)` float32 multi-hot
            rows when `multi_label`. Lists are converted.
        class_names: list[str]. Names of the class ids (the training set's).
        kind: str. `"image"` or `"text"`.
        multi_label: bool. Whether an example can have several labels. Defaults to `False`.
        source: str. The file or folder the examples came from. Defaults to `""`.
        skipped: list[str]. What loading skipped, each worth a warning: corrupt image paths,
            `"<file> line <n>"` (or the file) of empty texts. Defaults to `[]`.
        ignored: int. Files of other types found in the folders; not a problem, only counted.
            Defaults to `0`.

    Example:

    ```python
    examples = Examples(["a.png", "b.png"], [0, 1], ["cat", "dog"], "image")
    examples.counts()  # {'cat': 1, 'dog': 1}
    ```
    """

    inputs: list[str]
    labels: np.ndarray
    class_names: list[str]
    kind: str
    multi_label: bool = False
    source: str = ""
    skipped: list[str] = field(default_factory=list)
    ignored: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"Expected `kind` to be one of {KINDS}. Received: kind={self.kind!r}")
        self.labels = np.asarray(self.labels, np.float32 if self.multi_label else np.int32)
        if len(self.labels) != len(self.inputs):
            raise DataError(
                f"Got {len(self.inputs)} inputs but {len(self.labels)} labels"
                + (f" from {self.source}." if self.source else ".")
            )

    def __len__(self) -> int:
        return len(self.inputs)

    def counts(self) -> dict[str, int]:
        """Examples per class (positives per class when multi-label)."""
        if self.multi_label:
            totals = self.labels.sum(axis=0) if len(self) else np.zeros(len(self.class_names))
        else:
            totals = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(total) for name, total in zip(self.class_names, totals, strict=True)}

    def subset(self, indices: Sequence[int]) -> Examples:
        """The examples at `indices`, in that order (without `skipped` and `ignored`)."""
        index = np.asarray(indices, dtype=np.int64)
        return Examples(
            [self.inputs[i] for i in index],
            self.labels[index],
            list(self.class_names),
            self.kind,
            multi_label=self.multi_label,
            source=self.source,
        )


@dataclass
class LabelledData:
    """The train / val / test splits of one dataset, with the class names.

    Args:
        train: Examples. The training split.
        val: Examples or None. The validation split.
        test: Examples or None. The test split.
        class_names: list[str]. Names of the class ids, shared by every split.
        kind: str. `"image"` or `"text"`.
        multi_label: bool. Whether an example can have several labels. Defaults to `False`.
    """

    train: Examples
    val: Examples | None
    test: Examples | None
    class_names: list[str]
    kind: str
    multi_label: bool = False

    def _splits(self) -> dict[str, Examples]:
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return {name: split for name, split in splits.items() if split is not None}

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Examples per class of each split that exists."""
        return {name: split.counts() for name, split in self._splits().items()}

    def summary(self) -> dict[str, Any]:
        """JSON-able facts worth recording in a run's `config.json`.

        Split sizes are 0 for a split that does not exist; `skipped` and `ignored` are totals
        over the splits.
        """
        splits = self._splits()
        return {
            "kind": self.kind,
            "classes": list(self.class_names),
            "multi_label": self.multi_label,
            **{
                f"{name}_examples": len(splits[name]) if name in splits else 0
                for name in ("train", "val", "test")
            },
            "skipped": sum(len(split.skipped) for split in splits.values()),
            "ignored": sum(split.ignored for split in splits.values()),
        }


def with_validation_split(
    train: Examples,
    val: Examples | None,
    test: Examples | None,
    *,
    val_split: float,
    seed: int,
) -> LabelledData:
    """Puts the splits together, carving a stratified validation split out of `train` if needed.

    When there is no `val` and `val_split > 0`, a seeded share `val_split` of each class moves
    to validation: every class keeps at least one example on the training side, and a class
    with two or more examples gets at least one on the validation side. Multi-label rows are
    grouped by their rarest label (rows without labels form their own group), which keeps
    rare labels in both parts. Both parts keep file order, and the same seed gives the same
    split. The training part keeps `train.skipped` and `train.ignored`.

    Args:
        train: Examples. The training examples.
        val: Examples or None. Separate validation examples; when given, nothing is split.
        test: Examples or None. Test examples.
        val_split: float. Share of `train` for validation, in [0, 1); 0 disables the split.
        seed: int. Seed of the shuffle inside each class.

    Returns:
        `LabelledData` whose `val` is None when there is no validation split or it is empty.

    Raises:
        DataError: `val_split` is outside [0, 1), or `val` / `test` do not match `train`'s
            kind or class names.

    Example:

    ```python
    data = with_validation_split(examples, None, None, val_split=0.2, seed=0)
    len(data.train), len(data.val)  # (80, 20) for 100 examples
    ```
    """
    if isinstance(val_split, bool) or not 0.0 <= val_split < 1.0:
        raise DataError(
            f"Expected `val_split` to be a fraction in [0, 1). Received: val_split={val_split!r}"
        )
    for name, split in (("val", val), ("test", test)):
        if split is not None:
            _check_matches_train(name, split, train)
    if val is None and val_split > 0:
        train_idx, val_idx = stratified_split(_strata(train), val_split, seed)
        train_part = train.subset(train_idx)
        train_part.skipped, train_part.ignored = list(train.skipped), train.ignored
        val = train.subset(val_idx) if val_idx else None
        train = train_part
    return LabelledData(
        train,
        val,
        test,
        class_names=list(train.class_names),
        kind=train.kind,
        multi_label=train.multi_label,
    )


def _check_matches_train(name: str, split: Examples, train: Examples) -> None:
    """Raises `DataError` unless `split` has the training examples' kind and class names."""
    if (split.kind, split.multi_label) != (train.kind, train.multi_label):
        raise DataError(
            f"Expected {name} examples of the training kind ({train.kind}, "
            f"multi_label={train.multi_label}). Received: {split.kind}, "
            f"multi_label={split.multi_label} from {split.source!r}."
        )
    if list(split.class_names) != list(train.class_names):
        raise DataError(
            f"Expected the {name} examples to use the training class names "
            f"{train.class_names}. Received: {split.class_names} from {split.source!r}."
        )


def _strata(examples: Examples) -> np.ndarray:
    """The group of each example a stratified split keeps the shares of."""
    if not examples.multi_label:
        return examples.labels
    labels = examples.labels
    frequency = labels.sum(axis=0)
    rarity = np.where(labels > 0, frequency[None, :], np.inf)
    return np.where(labels.any(axis=1), rarity.argmin(axis=1), -1)
