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

from tfxfer.demo_data.paths import DEMO_CLASSES, DEMO_SPLITS, demo_text_paths

__all__ = ["DEMO_CLASSES", "DEMO_SPLITS", "demo_text_paths"]
