"""Every notebook in notebooks/ runs top to bottom, headless, with tiny parameters."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

# Each notebook runs in a kernel of its own.
pytestmark = pytest.mark.slow

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"

# Parameters each notebook runs with here: small enough for 2 CPU cores in a minute.
TINY = {
    "image_quickstart.ipynb": {
        "BACKBONE": "mobilenetv3small",
        "IMAGE_SIZE": 32,
        "HEAD_EPOCHS": 1,
        "FINETUNE_EPOCHS": 1,
        # Two copies of the small backbone: fusion's code path at a fraction of the cost.
        "FUSE_WITH": "mobilenetv3small",
    },
    "text_quickstart.ipynb": {"HEAD_EPOCHS": 1, "FINETUNE_EPOCHS": 0, "MAX_TRAIN_EXAMPLES": 40},
    "pretrain_then_finetune.ipynb": {
        "SEQUENCE_LENGTH": 16,
        "PRETRAIN_EPOCHS": 1,
        "MAX_UNLABELLED": 40,
        "LABELS_PER_CLASS": 4,
        "HEAD_EPOCHS": 1,
        "FINETUNE_EPOCHS": 0,
        "IMAGE_SIZE": 32,
        "IMAGES_PER_CLASS": 4,
        "SIMCLR_EPOCHS": 1,
    },
}


def _parameterize(notebook, overrides: dict, output_dir: str) -> None:
    cell = next(c for c in notebook.cells if c.cell_type == "code")
    assert "Parameters" in cell.source, "the first code cell must hold the parameters"
    lines = [f"{k} = {v!r}" for k, v in {**overrides, "OUTPUT_DIR": output_dir}.items()]
    cell.source += "\n# test overrides\n" + "\n".join(lines)


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs(name, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    overrides = dict(TINY.get(name, {}))
    if name == "pretrain_then_finetune.ipynb":
        # The chain builds its backbone four times: a tiny random BERT keeps it to seconds.
        from bert_helpers import write_hf_checkpoint

        write_hf_checkpoint(tmp_path / "bert")
        overrides["BACKBONE"] = str(tmp_path / "bert")
    _parameterize(notebook, overrides, str(tmp_path / "run"))
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    client.execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    # Every notebook ends with a saved model in its run directory.
    assert (tmp_path / "run" / "model.keras").exists()
