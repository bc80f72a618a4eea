"""The demo text dataset that ships with tfxfer: short English sentences in five topics.

`train.csv` (400 rows) and `test.csv` (150 rows) have the columns `text,label`, balanced
over `DEMO_CLASSES`. The project wrote them: `tools/make_demo_text.py` generates both files,
the same bytes on every run, from many sentence templates and word lists per class.

The test split is a fair check of transfer learning, not of memorisation: most of its
sentences use templates and class words (sports, dishes, devices, symptoms) that never occur
in train, so a bag-of-words model trained on train scores about 0.83 on test while a frozen
pretrained MiniLM with a linear head scores about 0.99. A person labels every sentence
correctly. No text, and no sentence with only a person, place or time swapped, appears
twice.

Example:

```python
from tfxfer.demo_data import DEMO_CLASSES, demo_text_paths

paths = demo_text_paths()  # {"train": Path(".../train.csv"), "test": Path(".../test.csv")}
```
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from tfxfer.errors import DataError

__all__ = ["DEMO_CLASSES", "DEMO_SPLITS", "demo_text_paths"]

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
    root = importlib.resources.files(__name__)
    paths = {split: Path(str(root.joinpath(f"{split}.csv"))) for split in DEMO_SPLITS}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise DataError(
            f"The demo dataset files are missing: {missing}. This tfxfer install left out its "
            f"package data (tfxfer/demo_data/*.csv); reinstall it, or regenerate the files "
            f"with `python tools/make_demo_text.py` in a source checkout."
        )
    return paths
