"""Bad input through the real command line ends in one line, exit status 2, nothing lost.

One table, `CASES`: each row is a bad input a user could type, run through a command-line
entry point (the image recipe, the text recipe, or the `tfxfer` command). Whatever the input,
the user must read exactly one line on stderr, `tfxfer: error: ...`, naming the problem; the
process must exit with status 2; no traceback may show; and no file that existed before the
run (the inputs, an earlier run) may be gone or changed after it.

To add a case, add a row: an id, a function `(inputs, tmp) -> argv` (it may write the bad file
it needs into `tmp`, the case's own folder and working directory), and a fragment of the
expected message. Rows run through `python -m ...` in another interpreter, one after another
(`bad_input_driver.py`: each with its own working directory, stdout and stderr, TensorFlow
imported once for all; a row whose flags name `--backbone tinynet` runs with the tiny rows
registered, for the rows that must build and train a network to fail, where which network
does not matter); a row that only checks what a config validates may say
`in_process=True` and run through `command_line` / `cli.main` in this process instead.
In-process rows are in the default test tier, the others in the large one.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from bert_helpers import write_hf_checkpoint
from helpers import REPO_ROOT, snapshot_files, tiny_backbone, write_image

IMAGE_RECIPE = "recipes.resnet50_image_classifier"
TEXT_RECIPE = "recipes.bert_text_classifier"
CLI = "tfxfer.cli"
# TensorFlow's C++ start-up lines (oneDNN, CUDA probing, CPU features) go to stderr before
# any Python code runs, whatever TF_CPP_MIN_LOG_LEVEL says; they are not tfxfer's output.
TF_LOG_LINE = re.compile(
    r"^([IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] |WARNING: All log messages before "
    r"absl::InitializeLog\(\)|To enable the following instructions:)"
)
SUBPROCESS_TIMEOUT_S = 300


# === Inputs every case may use ===


@dataclass(frozen=True)
class Inputs:
    """Good inputs, written once; a case turns one thing bad."""

    root: Path
    shapes: str  # an image folder: three classes of 32 px PNGs
    bert: str  # a tiny random Hugging Face BERT directory
    train_csv: str  # labelled texts, classes "neg" and "pos"
    image_model: str  # model.keras of an image model (3 classes), class_names.json beside
    text_model: str  # model.keras of a text model (2 classes), class_names.json beside


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    import json

    import tfxfer
    from tfxfer.data.synthetic import write_shapes_dataset
    from tfxfer.export import save_model, serving_model

    root = tmp_path_factory.mktemp("inputs")
    shapes = write_shapes_dataset(str(root / "shapes"), per_class=4, image_size=32, seed=0)
    write_hf_checkpoint(root / "bert")
    rows = [f"i loved it {i},pos\ni hated it {i},neg\n" for i in range(6)]
    (root / "train.csv").write_text("text,label\n" + "".join(rows), encoding="utf-8")

    def saved_run(name: str, backbone, classes: list[str]) -> str:
        """An untrained model saved as a run would save it, with its class names beside."""
        model = tfxfer.build_model(backbone, len(classes))
        path = save_model(serving_model(model, backbone), str(root / name / "model.keras"))
        (root / name / "class_names.json").write_text(json.dumps(classes), encoding="utf-8")
        return path

    # The tiny image backbone (same ImagePreprocessing input as every image backbone): a dozen
    # cases load this model, in this process and in subprocesses, and none is about its size.
    image = tiny_backbone(image_size=32)
    text = tfxfer.build_backbone(str(root / "bert"), sequence_length=8)
    return Inputs(
        root,
        shapes,
        bert=str(root / "bert"),
        train_csv=str(root / "train.csv"),
        image_model=saved_run("image_run", image, ["circle", "square", "triangle"]),
        text_model=saved_run("text_run", text, ["neg", "pos"]),
    )


# === How a case is written ===

Argv = Callable[[Inputs, Path], list[str]]


@dataclass(frozen=True)
class Case:
    """One bad input.

    Args:
        id: str. The test id.
        argv: callable. `(inputs, tmp) -> ["-m", module, *flags]`; may write files in `tmp`.
        message: str. A fragment of the expected `tfxfer: error:` line.
        in_process: bool. Run through `command_line` / `cli.main` here (for what fails
            before anything is loaded) instead of a subprocess. Defaults to `False`.
        patch: callable or None. `patch(monkeypatch)` before an in-process run, to fake
            what a test cannot make real (a file root may not read). Defaults to `None`.
        skip: str or None. Why the case cannot run here; None runs it. Defaults to `None`.
    """

    id: str
    argv: Argv
    message: str
    in_process: bool = False
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    skip: str | None = None


def image_run(d: Inputs, tmp: Path, *flags: str) -> list[str]:
    """The image recipe at its cheapest on the good data; `flags` come last and win."""
    return [
        "-m", IMAGE_RECIPE, "--data-dir", d.shapes, "--output-dir", str(tmp / "run"),
        "--weights", "none", "--image-size", "32", "--batch-size", "4", "--head-epochs", "1",
        "--finetune-epochs", "0", "--no-export", "--verbose", "0", *flags,
    ]  # fmt: skip


def text_run(d: Inputs, tmp: Path, *flags: str) -> list[str]:
    """The text recipe at its cheapest (tiny BERT, 8 tokens); `flags` come last and win."""
    return [
        "-m", TEXT_RECIPE, "--train", d.train_csv, "--backbone", d.bert,
        "--output-dir", str(tmp / "run"), "--sequence-length", "8", "--batch-size", "4",
        "--head-epochs", "1", "--finetune-epochs", "0", "--no-export", "--verbose", "0", *flags,
    ]  # fmt: skip


def tfxfer(*args: str) -> list[str]:
    return ["-m", CLI, *args]


def write(tmp: Path, name: str, content: str | bytes) -> str:
    """Writes a file into the case's folder; returns its path."""
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def folder(tmp: Path, name: str, mode: int | None = None) -> str:
    path = tmp / name
    path.mkdir(parents=True, exist_ok=True)
    if mode is not None:
        path.chmod(mode)
    return str(path)


def earlier_run(tmp: Path) -> str:
    """A run directory an earlier run left (a config.json), to be kept whatever happens."""
    write(tmp, "run/config.json", '{"seed": 0}\n')
    return str(tmp / "run")


def truncated(path: str, tmp: Path) -> str:
    with open(path, "rb") as handle:
        return write(tmp, "model.keras", handle.read()[: os.path.getsize(path) // 2])


def corrupt_class(d: Inputs, tmp: Path) -> str:
    """A copy of the shapes with one class whose images are all corrupt."""
    import shutil

    data = tmp / "shapes"
    shutil.copytree(d.shapes, data)
    for path in (data / "square").iterdir():
        path.write_bytes(b"not a png")
    return str(data)


def deny_reading(name: str) -> Callable[[pytest.MonkeyPatch], None]:
    """Makes reading files named `name` fail with EACCES, as chmod 000 does for non-root."""

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        read_bytes, scandir, listdir = Path.read_bytes, os.scandir, os.listdir

        def denied(path):
            return PermissionError(errno.EACCES, "Permission denied", str(path))

        def guarded_read_bytes(self):
            if self.name == name:
                raise denied(self)
            return read_bytes(self)

        def guarded_scandir(path="."):
            if os.path.basename(os.fspath(path)) == name:
                raise denied(path)
            return scandir(path)

        def guarded_listdir(path="."):
            if os.path.basename(os.fspath(path)) == name:
                raise denied(path)
            return listdir(path)

        monkeypatch.setattr(Path, "read_bytes", guarded_read_bytes)
        monkeypatch.setattr(os, "scandir", guarded_scandir)
        monkeypatch.setattr(os, "listdir", guarded_listdir)

    return patch


def deny_tf_reading(name: str) -> Callable[[pytest.MonkeyPatch], None]:
    """Makes `tf.io.read_file` fail as it does on a file without read permission."""

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        import tensorflow as tf

        read_file = tf.io.read_file

        def guarded(path, *args, **kwargs):
            if os.path.basename(str(path)) == name:
                raise tf.errors.PermissionDeniedError(None, None, f"{path}; Permission denied")
            return read_file(path, *args, **kwargs)

        monkeypatch.setattr(tf.io, "read_file", guarded)

    return patch


IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
BAD_JSONL = '{"text": "a", "label": "x"}\n{oops\n'
LATIN1_CSV = "text,label\ncaf\xe9 au lait,pos\nbad,neg\n".encode("latin-1")

# fmt: off
CASES = [
    # --- the image recipe ---
    Case("output-dir-under-a-file",
         lambda d, t: image_run(d, t, "--output-dir", write(t, "a_file", "x") + "/run"),
         "is a file"),
    Case("output-dir-in-a-read-only-folder",
         lambda d, t: image_run(d, t, "--output-dir", folder(t, "locked", 0o555) + "/run"),
         "is not writable", in_process=True,
         skip="running as root: chmod does not stop root" if IS_ROOT else None),
    Case("output-dir-that-cannot-be-created",  # /proc takes no new folders, even from root
         lambda d, t: image_run(d, t, "--output-dir", "/proc/tfxfer-run"),
         "Cannot use '/proc/tfxfer-run'",
         skip=None if os.path.isdir("/proc/self") else "no /proc on this system"),
    Case("output-dir-holds-an-earlier-run",
         lambda d, t: image_run(d, t, "--output-dir", earlier_run(t)),
         "already holds a run", in_process=True),
    Case("overwrite-and-resume",
         lambda d, t: image_run(d, t, "--overwrite", "--resume"),
         "overwrite and resume", in_process=True),
    Case("resume-a-run-without-checkpoint",
         lambda d, t: image_run(d, t, "--output-dir", earlier_run(t), "--resume",
                                "--backbone", "tinynet"),
         "no complete checkpoint"),
    Case("image-size-too-large-for-memory",
         lambda d, t: image_run(d, t, "--image-size", "100000"),
         "image_size=100000 (expected at most 1024", in_process=True),
    Case("image-size-not-a-number",
         lambda d, t: image_run(d, t, "--image-size", "big"),
         "argument --image-size: expected int, got 'big' (see "),
    Case("unknown-tfxfer-command",
         lambda d, t: tfxfer("bogus"),
         "invalid choice: 'bogus'"),
    Case("image-size-zero",
         lambda d, t: image_run(d, t, "--image-size", "0"), "image_size=0", in_process=True),
    Case("head-learning-rate-inf",
         lambda d, t: image_run(d, t, "--head-learning-rate", "inf"),
         "head_learning_rate=inf (expected a finite number > 0, or auto", in_process=True),
    Case("finetune-learning-rate-nan",
         lambda d, t: image_run(d, t, "--finetune-learning-rate", "nan"),
         "finetune_learning_rate=nan", in_process=True),
    Case("learning-rate-so-high-training-diverges",
         lambda d, t: image_run(d, t, "--head-learning-rate", "1e30",
                                "--backbone", "tinynet"),
         "Training diverged"),
    Case("negative-epochs",
         lambda d, t: image_run(d, t, "--head-epochs", "-1"), "head_epochs=-1", in_process=True),
    Case("zero-epochs-in-every-stage",
         lambda d, t: image_run(d, t, "--head-epochs", "0", "--finetune-epochs", "0"),
         "nothing would train", in_process=True),
    Case("negative-seed",
         lambda d, t: image_run(d, t, "--seed", "-1"),
         "seed=-1 (expected an integer >= 0)", in_process=True),
    Case("zero-batch-size",
         lambda d, t: image_run(d, t, "--batch-size", "0"), "batch_size=0", in_process=True),
    Case("unknown-strategy",
         lambda d, t: image_run(d, t, "--strategy", "gpu_cluster"),
         "strategy='gpu_cluster'", in_process=True),
    Case("unknown-mixed-precision",
         lambda d, t: image_run(d, t, "--mixed-precision", "fp8"),
         "mixed_precision='fp8'", in_process=True),
    Case("unfreeze-nonsense",
         lambda d, t: image_run(d, t, "--unfreeze", "most"), "unfreeze='most'", in_process=True),
    Case("unfreeze-more-groups-than-the-backbone-has",
         lambda d, t: image_run(d, t, "--unfreeze", "99", "--finetune-epochs", "1",
                                "--backbone", "mobilenetv3small"),
         "train=99 top groups", in_process=True),
    Case("val-split-1",
         lambda d, t: image_run(d, t, "--val-split", "1"), "val_split=1.0", in_process=True),
    Case("dropout-1",
         lambda d, t: image_run(d, t, "--dropout", "1"), "dropout=1.0", in_process=True),
    Case("missing-weights-file",
         lambda d, t: image_run(d, t, "--weights", str(t / "missing_notop.h5")),
         "Weights file not found", in_process=True),
    Case("unknown-backbone",
         lambda d, t: image_run(d, t, "--backbone", "resnet5O"), "Unknown backbone",
         in_process=True),
    Case("missing-data-dir",
         lambda d, t: image_run(d, t, "--data-dir", str(t / "photos")),
         "Data directory not found", in_process=True),
    Case("data-dir-is-a-file",
         lambda d, t: image_run(d, t, "--data-dir", write(t, "photos.zip", b"PK")),
         "photos.zip' is a file, not a folder", in_process=True),
    Case("data-dir-unreadable",
         lambda d, t: image_run(d, t, "--data-dir", folder(t, "locked_photos")),
         "Cannot read data directory", in_process=True, patch=deny_reading("locked_photos")),
    Case("a-class-of-corrupt-images",
         lambda d, t: image_run(d, t, "--data-dir", corrupt_class(d, t)),
         "has no readable images", in_process=True),
    Case("test-dir-with-an-unknown-class",
         lambda d, t: image_run(d, t, "--test-dir", os.path.dirname(folder(t, "test/hexagon"))),
         "classes that the training data does not", in_process=True),
    # --- the text recipe ---
    Case("missing-text-column",
         lambda d, t: text_run(d, t, "--text-column", "review"),
         "no column 'review'. Columns found: ['text', 'label']. Pass --text-column / "
         "--label-column (text_column= / label_column= in Python)"),
    Case("csv-not-utf8",
         lambda d, t: text_run(d, t, "--train", write(t, "latin1.csv", LATIN1_CSV)),
         "is not UTF-8: byte 14 (line 2)"),
    Case("sequence-length-longer-than-the-model-takes",
         lambda d, t: text_run(d, t, "--sequence-length", "100000"),
         "max_sequence_length=64"),
    Case("missing-train-file",
         lambda d, t: text_run(d, t, "--train", str(t / "reviews.csv")),
         "does not exist", in_process=True),
    Case("train-csv-is-a-folder",
         lambda d, t: text_run(d, t, "--train", folder(t, "reviews.csv")),
         "has no class subfolders", in_process=True),
    Case("train-csv-unreadable",
         lambda d, t: text_run(d, t, "--train", write(t, "locked.csv", "text,label\n")),
         "Cannot read text file", in_process=True, patch=deny_reading("locked.csv")),
    Case("csv-row-with-an-unquoted-comma",
         lambda d, t: text_run(d, t, "--train", write(
             t, "comma.csv", "text,label\ngood film,pos\nbad film,neg\nfine,pos,neutral\n")),
         "line 4 has 3 fields", in_process=True),
    Case("csv-with-one-class",
         lambda d, t: text_run(d, t, "--train", write(t, "one.csv", "text,label\na,x\nb,x\n")),
         "has only one class", in_process=True),
    Case("test-csv-with-an-unknown-label",
         lambda d, t: text_run(d, t, "--test", write(t, "test.csv", "text,label\nok,meh\n")),
         "label(s) ['meh']", in_process=True),
    Case("csv-header-names-a-column-twice",
         lambda d, t: text_run(d, t, "--train", write(
             t, "twice.csv", "text,label,label\ngood,pos,neg\nbad,neg,pos\n")),
         "line 1 names the column 'label' twice", in_process=True),
    # --- config files ---
    Case("config-yaml-gives-a-key-twice",
         lambda d, t: tfxfer("train", write(
             t, "run.yaml", "recipe: bert_text_classifier\nseed: 1\nseed: 2\n")),
         "line 3, column 1: the key 'seed' is given twice (first on line 2)", in_process=True),
    Case("set-an-index-of-a-list-the-config-does-not-set",
         lambda d, t: tfxfer("train", "bert_text_classifier", "--set", "hidden_units.5=3"),
         "'5' is an index, but hidden_units has no items to index here", in_process=True),
    Case("config-json-gives-a-key-twice",
         lambda d, t: tfxfer("train", write(
             t, "run.json", '{"recipe": "bert_text_classifier", "seed": 1, "seed": 2}')),
         "gives the key 'seed' twice", in_process=True),
    Case("jsonl-line-not-json",
         lambda d, t: text_run(d, t, "--train", write(t, "bad.jsonl", BAD_JSONL)),
         "line 2 is not valid JSON", in_process=True),
    Case("multi-label-without-separator",
         lambda d, t: text_run(d, t, "--multi-label", "--label-separator", ""),
         "label_separator=''", in_process=True),
    Case("text-sequence-length-zero",
         lambda d, t: text_run(d, t, "--sequence-length", "0"),
         "sequence_length=0", in_process=True),
    # --- tfxfer predict ---
    Case("predict-corrupt-image",
         lambda d, t: tfxfer("predict", "--model", d.image_model,
                             "--images", write(t, "photo.png", b"not a png")),
         "Cannot read '"),
    Case("predict-missing-image",
         lambda d, t: tfxfer("predict", "--model", d.image_model, "--images", str(t / "no.png")),
         "Image not found", in_process=True),
    Case("predict-image-path-is-a-folder",
         lambda d, t: tfxfer("predict", "--model", d.image_model,
                             "--images", folder(t, "photo.png")),
         "is a folder", in_process=True),
    Case("predict-unreadable-image",
         lambda d, t: tfxfer("predict", "--model", d.image_model,
                             "--images", write_image(str(t / "locked.png"))),
         "Permission denied", in_process=True, patch=deny_tf_reading("locked.png")),
    Case("predict-texts-with-an-image-model",
         lambda d, t: tfxfer("predict", "--model", d.image_model, "--texts", "a fine film"),
         "takes images"),
    Case("predict-images-with-a-text-model",
         lambda d, t: tfxfer("predict", "--model", d.text_model,
                             "--images", write_image(str(t / "photo.png"))),
         "takes texts"),
    Case("predict-class-names-not-json",
         lambda d, t: tfxfer("predict", "--model", d.image_model,
                             "--class-names", write(t, "names.txt", "circle\nsquare\n"),
                             "--images", write_image(str(t / "photo.png"))),
         "is not JSON", in_process=True),
    Case("predict-class-names-shorter-than-outputs",
         lambda d, t: tfxfer("predict", "--model", d.image_model,
                             "--class-names", write(t, "names.json", '["circle"]'),
                             "--images", write_image(str(t / "photo.png"))),
         "has 1 name(s) but the model has 3 outputs", in_process=True),
    Case("predict-model-is-not-a-keras-file",
         lambda d, t: tfxfer("predict", "--model", write(t, "model.keras", "hello"),
                             "--texts", "x"),
         "is not a Keras model", in_process=True),
    Case("predict-model-is-truncated",
         lambda d, t: tfxfer("predict", "--model", truncated(d.image_model, t),
                             "--images", write_image(str(t / "photo.png"))),
         "or is truncated"),
    Case("predict-model-is-a-folder",
         lambda d, t: tfxfer("predict", "--model", folder(t, "run"), "--texts", "x"),
         "is a folder", in_process=True),
    Case("predict-model-missing",
         lambda d, t: tfxfer("predict", "--model", str(t / "model.keras"), "--texts", "x"),
         "Model file not found", in_process=True),
    Case("predict-a-binary-file-with-a-text-model",
         lambda d, t: tfxfer("predict", "--model", d.text_model,
                             write(t, "weights.bin", b"\x00\x01")),
         "weights.bin' is a file, but not one tfxfer reads texts from", in_process=True),
    Case("predict-a-blank-txt-with-a-text-model",
         lambda d, t: tfxfer("predict", "--model", d.text_model, write(t, "blank.txt", "\n\n")),
         "blank.txt' holds no texts", in_process=True),
    Case("predict-nothing",
         lambda d, t: tfxfer("predict", "--model", d.image_model), "Nothing to predict",
         in_process=True),
    # --- tfxfer evaluate ---
    Case("evaluate-texts-with-an-image-model",
         lambda d, t: tfxfer("evaluate", "--model", d.image_model, "--text-file", d.train_csv),
         "takes images"),
    Case("evaluate-images-with-a-text-model",
         lambda d, t: tfxfer("evaluate", "--model", d.text_model, "--images-dir", d.shapes),
         "takes texts", in_process=True),
    Case("evaluate-images-dir-is-a-file",
         lambda d, t: tfxfer("evaluate", "--model", d.image_model, "--images-dir", d.train_csv),
         "train.csv' is a file, not a folder", in_process=True),
    Case("evaluate-batch-size-0",
         lambda d, t: tfxfer("evaluate", "--model", d.image_model, "--images-dir", d.shapes,
                             "--batch-size", "0"),
         "Expected --batch-size to be a positive integer. Received: 0"),
    Case("evaluate-without-data",
         lambda d, t: tfxfer("evaluate", "--model", d.image_model),
         "Pass exactly one of --images-dir", in_process=True),
    Case("evaluate-labels-the-model-does-not-have",
         lambda d, t: tfxfer("evaluate", "--model", d.text_model,
                             "--text-file", write(t, "eval.csv", "text,label\nok,meh\n")),
         "label(s) ['meh']", in_process=True),
    Case("evaluate-missing-text-column",
         lambda d, t: tfxfer("evaluate", "--model", d.text_model, "--text-file", d.train_csv,
                             "--text-column", "review"),
         "Pass --text-column / --label-column", in_process=True),
    # --- tfxfer export ---
    Case("export-onto-an-existing-file",
         lambda d, t: tfxfer("export", "--model", d.image_model,
                             "--output", write(t, "export", "keep me")),
         "Refusing to export"),
    Case("export-under-a-file",
         lambda d, t: tfxfer("export", "--model", d.image_model,
                             "--output", write(t, "a_file", "keep me") + "/export"),
         "Cannot use"),
    Case("export-onto-a-folder-tfxfer-did-not-write",
         lambda d, t: tfxfer("export", "--model", d.image_model,
                             "--output", os.path.dirname(write(t, "mine/notes.txt", "keep"))),
         "Refusing to export", in_process=True),
]
# fmt: on


# === Running a case ===


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str
    lost: list[str]  # files that existed before the run and are gone or changed after it


def _snapshots(paths: list[Path]) -> dict[Path, dict[str, bytes]]:
    return {path: snapshot_files(str(path)) for path in paths}


def _lost(before: dict[Path, dict[str, bytes]]) -> list[str]:
    lost = []
    for root, files in before.items():
        after = snapshot_files(str(root))
        lost += [str(root / name) for name, data in files.items() if after.get(name) != data]
    return lost


def _run_subprocess(
    argv: list[str], tmp: Path, watched: list[Path], timeout: float = SUBPROCESS_TIMEOUT_S
) -> Outcome:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    before = _snapshots(watched)
    process = subprocess.run(
        [sys.executable, *argv],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Outcome(process.returncode, process.stdout, process.stderr, _lost(before))


@pytest.fixture(scope="module")
def subprocess_outcomes(request, inputs, tmp_path_factory) -> dict[str, Outcome]:
    """Runs the selected command-line cases, one after another, in one other interpreter.

    `bad_input_driver.py` runs each as `python -m` would, with its own working directory,
    stdout and stderr, so TensorFlow's import is paid once rather than once a case; only the
    cases this session selected run (`-k` picks a few). What each case leaves is compared
    with what was there before any ran: a file lost from the shared inputs fails every case.
    """
    selected = {
        item.callspec.params["case"].id
        for item in request.session.items
        if getattr(item, "module", None) is sys.modules[__name__]
        and item.get_closest_marker("skip") is None  # the large tier, when not asked for
        and hasattr(item, "callspec")
        and "case" in item.callspec.params
    }
    jobs, folders = [], {}
    for case in CASES:
        if case.id in selected and not case.in_process and case.skip is None:
            tmp = tmp_path_factory.mktemp(case.id)
            logs = tmp_path_factory.mktemp(f"{case.id}-logs")
            folders[case.id] = (tmp, logs)
            argv = case.argv(inputs, tmp)
            jobs.append({
                "id": case.id, "argv": argv, "cwd": str(tmp),
                "stdout": str(logs / "stdout"), "stderr": str(logs / "stderr"),
                "tiny_rows": "tinynet" in argv,
            })  # fmt: skip
    if not jobs:
        return {}
    driver_dir = tmp_path_factory.mktemp("driver")
    (driver_dir / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    before = _snapshots([inputs.root, *(tmp for tmp, _ in folders.values())])
    driver = [
        str(Path(__file__).with_name("bad_input_driver.py")),
        str(driver_dir / "jobs.json"),
        str(driver_dir / "results.json"),
    ]
    ran = _run_subprocess(driver, driver_dir, [], timeout=SUBPROCESS_TIMEOUT_S * 3)
    results_file = driver_dir / "results.json"
    statuses = json.loads(results_file.read_text()) if results_file.exists() else {}
    shared_loss = _lost({inputs.root: before[inputs.root]})
    outcomes = {}
    for job in jobs:
        tmp, logs = folders[job["id"]]
        if job["id"] not in statuses:  # the driver itself died before or during this case
            outcomes[job["id"]] = Outcome(ran.status, ran.stdout, ran.stderr, shared_loss)
            continue
        outcomes[job["id"]] = Outcome(
            statuses[job["id"]],
            (logs / "stdout").read_text(errors="replace"),
            (logs / "stderr").read_text(errors="replace"),
            shared_loss + _lost({tmp: before[tmp]}),
        )
    return outcomes


def _run_in_process(case: Case, inputs: Inputs, tmp: Path, monkeypatch, capsys) -> Outcome:
    from tfxfer import cli
    from tfxfer.recipe import command_line

    argv = case.argv(inputs, tmp)
    assert argv[0] == "-m", "an in-process case runs a module: ['-m', module, *flags]"
    module, flags = argv[1], argv[2:]
    monkeypatch.chdir(tmp)
    before = _snapshots([inputs.root, tmp])
    if case.patch is not None:
        case.patch(monkeypatch)
    capsys.readouterr()
    if module == CLI:
        status = cli.main(flags)
    else:
        recipe = importlib.import_module(module)
        status = command_line(recipe.main, recipe.Config, argv=flags)
    monkeypatch.undo()  # the snapshot after must read files as they are
    captured = capsys.readouterr()
    return Outcome(status, captured.out, captured.err, _lost(before))


def _tiered(cases: list[Case]) -> list:
    """The in-process cases in the default tier; the subprocess ones (each pays TensorFlow's
    import, the recipe ones train) in the large tier."""
    return [
        pytest.param(case, id=case.id, marks=() if case.in_process else pytest.mark.large)
        for case in cases
    ]


@pytest.mark.parametrize("case", _tiered(CASES))
def test_bad_input_ends_in_one_line_and_loses_nothing(
    case, inputs, subprocess_outcomes, tmp_path, monkeypatch, capsys
):
    if case.skip:
        pytest.skip(case.skip)
    if case.in_process:
        outcome = _run_in_process(case, inputs, tmp_path, monkeypatch, capsys)
    else:
        outcome = subprocess_outcomes[case.id]
    shown = f"exit {outcome.status}\nstderr:\n{outcome.stderr}\nstdout:\n{outcome.stdout[-2000:]}"
    lines = [
        line for line in outcome.stderr.splitlines() if line.strip() and not TF_LOG_LINE.match(line)
    ]
    assert outcome.status == 2, shown
    assert len(lines) == 1 and lines[0].startswith("tfxfer: error: "), shown
    assert case.message in lines[0], shown
    assert "Traceback" not in outcome.stderr + outcome.stdout, shown
    assert not outcome.lost, f"files lost or changed: {outcome.lost}"


def test_case_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


# === An unexpected error: one line, exit 1; --debug shows the traceback ===

BUGGY_RECIPE = textwrap.dedent(
    """
    import sys
    from recipes.resnet50_image_classifier import Config
    from tfxfer.recipe import command_line

    def main(config):
        raise KeyError("a bug in tfxfer")

    sys.exit(command_line(main, Config, argv=sys.argv[1:]))
    """
)


@pytest.mark.parametrize(
    "debug",
    # --debug's traceback in the large tier: each case is a child interpreter, ~6 s.
    [False, pytest.param(True, marks=pytest.mark.large)],
    ids=["plain", "debug"],
)
def test_an_unexpected_error_is_one_line_unless_debug(debug, tmp_path):
    argv = ["-c", BUGGY_RECIPE, *(["--debug"] if debug else [])]
    outcome = _run_subprocess(argv, tmp_path, [tmp_path])
    lines = [
        line for line in outcome.stderr.splitlines() if line.strip() and not TF_LOG_LINE.match(line)
    ]
    assert outcome.status == 1, outcome.stderr
    if debug:
        assert "Traceback" in outcome.stderr and "KeyError: 'a bug in tfxfer'" in outcome.stderr
    else:
        assert lines == [
            "tfxfer: internal error: KeyError: 'a bug in tfxfer' "
            "(run with --debug for the traceback)"
        ], outcome.stderr
