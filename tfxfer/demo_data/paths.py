"""Where the demo text dataset's files are: `train.csv` and `test.csv` beside this module."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from tfxfer.errors import DataError

# Sorted, as a loader that sorts label names finds them.
DEMO_CLASSES: tuple[str, ...] = ("cooking", "health", "sports", "technology", "weather")
DEMO_SPLITS: tuple[str, ...] = ("train", "test")


def demo_text_paths() -> dict[str, Path]:
    """Returns the paths of the demo dataset's CSV files, `{"train": ..., "test": ...}`.

    The files are package data, found through `importlib.resources` so they resolve in a
    source checkout and in an installed wheel alike.

    Raises:
        DataError: the files are missing (a build of tfxfer that left out its package data).
    """
    root = importlib.resources.files(__package__)
    paths = {split: Path(str(root.joinpath(f"{split}.csv"))) for split in DEMO_SPLITS}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise DataError(
            f"The demo dataset files are missing: {missing}. This tfxfer install left out its "
            f"package data (tfxfer/demo_data/*.csv); reinstall it, or regenerate the files "
            f"with `python tools/make_demo_text.py` in a source checkout."
        )
    return paths
