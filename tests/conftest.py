"""Fixtures shared by the test suite. Builders that are plain functions live in `helpers.py`."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `import tfxfer` / `import recipes` without an install
    sys.path.insert(0, REPO_ROOT)

import keras  # noqa: E402
import pytest  # noqa: E402
from bert_helpers import write_hf_checkpoint, write_review_files  # noqa: E402
from helpers import register_tiny_backbones  # noqa: E402

from tfxfer.data.synthetic import write_shapes_dataset  # noqa: E402

UNREACHABLE_PROXY = "http://127.0.0.1:9"  # the discard port: connections fail at once

LARGE_REASON = (
    "large tier: real networks, notebooks or subprocess runs. Run it with `bash dev.sh "
    "test-large` / `test-all` (pytest --run-large), or name this test's id on the command line"
)

# Files whose tests take longest, longest first (`pytest --durations`, 2026-12-07). With one
# pytest-xdist worker per core and each file's tests kept together (`--dist loadfile`),
# files go to workers in collection order: started first, the long ones no longer leave the
# suite's last minutes to one core while the other idles.
HEAVY_FIRST = (
    "test_notebooks.py",
    "test_regularizers.py",
    "test_fusion.py",
    "test_multiworker_training.py",
    "test_bad_input.py",
    "test_text_recipe.py",
    "test_contrastive_pretrain.py",
    "test_mlm_pretrain.py",
    "test_resume.py",
    "test_image_recipe.py",
    "test_preemption.py",
)


def pytest_addoption(parser):
    parser.addoption(
        "--run-large",
        action="store_true",
        default=False,
        help="also run the tests marked `large` (real networks, notebooks, subprocess runs)",
    )


def _named_explicitly(config) -> set[str]:
    """The test ids given on the command line (`tests/test_x.py::test_y`): those always run."""
    return {arg.split("[")[0] for arg in config.args if "::" in arg}


def pytest_collection_modifyitems(config, items):
    """Skips the large tier unless asked; puts the heavy files first (a stable sort)."""
    if not config.getoption("--run-large"):
        named = _named_explicitly(config)
        skip = pytest.mark.skip(reason=LARGE_REASON)
        for item in items:
            if item.get_closest_marker("large") and not _is_named(item, named):
                item.add_marker(skip)
    rank = {name: index for index, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _is_named(item, named: set[str]) -> bool:
    """Whether `item` (or its parametrized family) was named by id on the command line."""
    file, _, rest = item.nodeid.partition("::")
    base = rest.split("[")[0]
    return any(
        arg.endswith(f"{file}::{base}") or arg.endswith(f"{item.path.name}::{base}")
        for arg in named
    )


@pytest.fixture(autouse=True)
def _restore_dtype_policy():
    """A test that sets a global mixed-precision policy must not leak it into the next one."""
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


@pytest.fixture
def offline(monkeypatch):
    """Makes every HTTP(S) request in this process fail fast, as on a machine with no network."""
    for name in (
        "https_proxy",
        "HTTPS_PROXY",
        "http_proxy",
        "HTTP_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.setenv(name, UNREACHABLE_PROXY)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> str:
    """A tiny three-class image folder (6 PNGs of 40 px per class)."""
    return write_shapes_dataset(
        str(tmp_path_factory.mktemp("shapes") / "data"), per_class=6, image_size=40, seed=0
    )


# What the image recipe's smoke run must show, per backbone: the tiny row in the default
# tier, the real ResNet50 in the large one.
IMAGE_RECIPE_BACKBONES = {
    "tinynet": {"groups": ["low", "mid", "top"], "batchnorms": 3},
    "resnet50": {"groups": ["stem", "conv2", "conv3", "conv4", "conv5"], "batchnorms": 53},
}


@pytest.fixture
def tiny_backbones(monkeypatch) -> list[str]:
    """The tiny rows ("tinynet", "tinynetb") in the image backbone table, for one test."""
    return register_tiny_backbones(monkeypatch)


@pytest.fixture(
    scope="session",
    params=["tinynet", pytest.param("resnet50", marks=pytest.mark.large)],
)
def _finished_image_recipe_run(request, shapes_dir, tmp_path_factory) -> dict:
    from recipes import resnet50_image_classifier as recipe

    backbone = request.param
    with pytest.MonkeyPatch.context() as monkeypatch:
        register_tiny_backbones(monkeypatch)
        keras.utils.set_random_seed(0)
        output_dir = str(tmp_path_factory.mktemp(f"recipe_{backbone}") / "run")
        config = recipe.Config.smoke(
            data_dir=shapes_dir,
            test_dir=shapes_dir,
            output_dir=output_dir,
            export=True,
            backbone=backbone,
            # ResNet50 fine-tunes its top group (conv5) only: tracing its whole backward
            # pass was most of this run. Whole-backbone fine-tuning runs on the tiny row here
            # and in the recipe tests that need it.
            **({"unfreeze": "1"} if backbone == "resnet50" else {}),
        )
        result = recipe.main(config)
    return {**result, "config": config, "expected": IMAGE_RECIPE_BACKBONES[backbone]}


@pytest.fixture
def image_recipe_run(_finished_image_recipe_run, tiny_backbones) -> dict:
    """One smoke run of the image recipe (32 px, one epoch per stage) with its export.

    On the tiny row in the default tier and on ResNet50 in the large one (the fixture is
    parametrized: each test that takes it runs once per backbone). Shared by the recipe
    tests, read-only (copy the run directory before changing it): the run is the expensive
    part, the checks are cheap. `expected` holds what the run must show for its backbone.
    """
    return _finished_image_recipe_run


@pytest.fixture(scope="session")
def uninterrupted_reference(tmp_path_factory) -> dict:
    """`schedule_worker.py`'s run (cpu, batch 16, 2 head + 3 fine-tuning epochs), never stopped.

    What a killed, preempted, resumed or two-worker run must end as: built once per pytest
    process for the resume, preemption and multi-worker tests. Read-only: copy `run_dir`
    before changing it.
    """
    import multiworker_helpers as mh
    import schedule_worker as sw

    root = tmp_path_factory.mktemp("uninterrupted")
    command = sw.command(root / "run", root / "out")
    result = mh.run_processes([command], [mh.child_env()], log_dir=root / "logs", timeout=150.0)
    assert result[0].ok, mh.describe_results(result)
    weights, summary = sw.load_result(root / "out")
    return {"run_dir": root / "run", "weights": weights, "summary": summary}


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A tiny random Hugging Face BERT checkpoint (`bert_helpers`), read-only."""
    path = tmp_path_factory.mktemp("bert") / "hf_bert"
    write_hf_checkpoint(path)
    return str(path)


@pytest.fixture(scope="session")
def review_files(tmp_path_factory) -> tuple[str, str]:
    """`(train.csv, test.csv)` of short labelled reviews ("neg", "pos"), read-only."""
    return write_review_files(tmp_path_factory.mktemp("texts"))


@pytest.fixture(scope="session")
def text_recipe_run(tiny_bert_dir, review_files, tmp_path_factory) -> dict:
    """One smoke run of the text recipe on the tiny BERT, with a test file and its export.

    Shared by the text recipe and run-as-backbone tests, read-only (copy before changing).
    """
    from recipes.bert_text_classifier import Config, main

    train, test = review_files
    output = tmp_path_factory.mktemp("runs") / "run"
    config = Config.smoke(train=train, output_dir=str(output), backbone=tiny_bert_dir)
    config.test, config.export = test, True
    return main(config)
