"""A run never deletes or changes a file it did not write, even when asked to overwrite.

Each test puts a user's files where a careless run would destroy them (a data folder or a
CSV inside the output directory, a directory that only holds the user's own `config.json`,
the current directory, an export target) and checks, byte for byte, that they are all still
there afterwards. The one thing `--overwrite` may delete is what the run's manifest lists.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat

import keras
import pytest
from helpers import (
    snapshot_files,
    tiny_arrays,
    tiny_model,
    tiny_train_data,
    tiny_val_data,
    write_image_folder,
)

import tfxfer
from recipes import bert_text_classifier as text_recipe
from recipes import resnet50_image_classifier as image_recipe
from tfxfer import cli
from tfxfer.errors import RunDirError, TfxferError
from tfxfer.export import EXPORT_MARKER, export_saved_model, save_model
from tfxfer.recipe import finish_run, open_run
from tfxfer.rundir import MANIFEST, RunDir, atomic_write_text


def _write(path, text="mine\n"):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return str(path)


def _manifest(path) -> list[str]:
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as handle:
        return json.load(handle)["entries"]


def _csv(path):
    return _write(path, "text,label\nthe match went on,sport\nrates rose,business\n")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> str:
    """A finished run of the tiny model, with its export: what every run leaves behind."""
    path = str(tmp_path_factory.mktemp("real") / "run")
    backbone, model = tiny_model()
    images, labels = tiny_arrays(n=12)
    val = tiny_val_data(images, labels)
    run_dir = open_run(path, {"seed": 0}, overwrite=False, resume=False)
    result = tfxfer.run_schedule(
        model,
        backbone,
        [tfxfer.Stage("head", 1)],
        tiny_train_data(images, labels),
        val,
        run_dir=run_dir,
        verbose=0,
    )
    finish_run(run_dir, model, result, ["r", "g", "b"], {"val": val}, export_saved_model=True)
    return path


def _copy(run: str, destination) -> str:
    return shutil.copytree(run, str(destination))


# === What a run records ===


def test_the_manifest_lists_exactly_what_the_run_wrote(real_run):
    written = sorted(n for n in os.listdir(real_run) if n != MANIFEST)
    assert _manifest(real_run) == written
    assert {"config.json", "history.csv", "checkpoints", "model.keras", "export"} <= set(written)
    assert not [n for n in written if n.startswith(".tmp-")]


def test_overwrite_of_a_real_run_removes_exactly_the_manifests_entries(real_run, tmp_path):
    path = _copy(real_run, tmp_path / "run")
    _write(os.path.join(path, ".tmp-abc123"), "a leftover of an atomic write")
    run_dir = RunDir(path, overwrite=True)
    assert sorted(os.listdir(path)) == [MANIFEST, "checkpoints"]
    assert os.listdir(run_dir.checkpoints) == []
    assert _manifest(path) == ["checkpoints"]


def test_a_user_file_beside_a_run_makes_overwrite_refuse(real_run, tmp_path):
    path = _copy(real_run, tmp_path / "run")
    _write(os.path.join(path, "notes.txt"))
    _csv(os.path.join(path, "data", "train.csv"))
    before = snapshot_files(path)
    with pytest.raises(RunDirError) as info:
        RunDir(path, overwrite=True)
    message = str(info.value)
    assert "'data'" in message and "'notes.txt'" in message and "did not write" in message
    assert snapshot_files(path) == before
    # Once the user has moved them out, --overwrite replaces the run.
    shutil.rmtree(os.path.join(path, "data"))
    os.remove(os.path.join(path, "notes.txt"))
    RunDir(path, overwrite=True)
    assert sorted(os.listdir(path)) == [MANIFEST, "checkpoints"]


def test_a_refusal_names_three_foreign_entries_and_counts_the_rest(real_run, tmp_path):
    path = _copy(real_run, tmp_path / "run")
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "e.txt"):
        _write(os.path.join(path, name))
    with pytest.raises(RunDirError, match=r"'a.txt', 'b.txt', 'c.txt' and 2 more"):
        RunDir(path, overwrite=True)


def test_a_run_never_writes_over_an_entry_it_did_not_write(tmp_path):
    path = str(tmp_path / "run")
    run_dir = RunDir(path)
    mine = _write(os.path.join(path, "training_curves.png"), "my own plot")
    before = snapshot_files(path)
    with pytest.raises(RunDirError, match="training_curves.png.*tfxfer did not write it"):
        run_dir.file("training_curves.png")
    assert snapshot_files(path) == before and open(mine).read() == "my own plot"
    for outside in ("../escape.json", "/tmp/elsewhere.json", "."):
        with pytest.raises(RunDirError, match="Expected a path"):
            run_dir.write_json(outside, {})
    assert not os.path.exists(tmp_path / "escape.json")


def test_a_linked_entry_is_unlinked_never_followed(tmp_path):
    data = write_image_folder(str(tmp_path / "photos"), {"cat": 2})
    before = snapshot_files(data)
    path = str(tmp_path / "run")
    run_dir = RunDir(path)
    os.symlink(data, run_dir.file("export"))  # the run's own entry, as a link to user data
    RunDir(path, overwrite=True)
    assert not os.path.lexists(os.path.join(path, "export"))
    assert snapshot_files(data) == before


def test_a_damaged_manifest_deletes_nothing(real_run, tmp_path):
    path = _copy(real_run, tmp_path / "run")
    _write(os.path.join(path, MANIFEST), json.dumps({"entries": ["config.json", "../data"]}))
    before = snapshot_files(path)
    with pytest.raises(RunDirError, match="cannot be read"):
        RunDir(path, overwrite=True)
    assert snapshot_files(path) == before


# === Directories that are not (only) a run ===


def test_a_csv_inside_the_output_dir_survives_overwrite(tmp_path):
    path = tmp_path / "out"
    _csv(path / "train.csv")
    before = snapshot_files(str(path))
    with pytest.raises(RunDirError, match="'train.csv'.*did not write"):
        RunDir(str(path), overwrite=True)
    assert snapshot_files(str(path)) == before
    # Without a flag it is refused too: a run directory is the run's alone.
    with pytest.raises(RunDirError, match="'train.csv'"):
        RunDir(str(path))
    assert sorted(os.listdir(path)) == ["train.csv"]


def test_a_users_own_config_json_is_never_taken_for_a_run(tmp_path):
    path = tmp_path / "project"
    _write(path / "config.json", '{"my": "settings"}')
    before = snapshot_files(str(path))
    with pytest.raises(RunDirError, match=f"no tfxfer manifest \\({MANIFEST}\\)"):
        RunDir(str(path), overwrite=True)
    assert snapshot_files(str(path)) == before and sorted(os.listdir(path)) == ["config.json"]
    with pytest.raises(RunDirError, match="already holds a run"):
        RunDir(str(path))
    # --resume does not adopt it (no checkpoint shows tfxfer wrote it), so a later --overwrite
    # still refuses it.
    RunDir(str(path), resume=True)
    assert _manifest(str(path)) == ["checkpoints"]
    with pytest.raises(RunDirError, match="'config.json'"):
        RunDir(str(path), overwrite=True)
    assert (path / "config.json").read_text() == '{"my": "settings"}'


def test_resume_adopts_a_run_from_before_the_manifest(real_run, tmp_path):
    path = _copy(real_run, tmp_path / "run")
    os.remove(os.path.join(path, MANIFEST))
    _write(os.path.join(path, "notes.txt"))
    with pytest.raises(RunDirError, match="no tfxfer manifest"):
        RunDir(path, overwrite=True)
    run_dir = RunDir(path, resume=True)
    assert run_dir.resumed
    assert "notes.txt" not in _manifest(path)
    assert set(_manifest(path)) == set(os.listdir(path)) - {MANIFEST, "notes.txt"}


@pytest.mark.parametrize("given", ["", "   ", ".", "CWD", "PARENT", "~", "/"])
def test_shared_locations_are_refused_as_output_dirs(tmp_path, monkeypatch, given):
    work = tmp_path / "home" / "work"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(_write(work / "config.json", "{}").rsplit(os.sep, 1)[0])
    _csv(work / "train.csv")
    before = snapshot_files(str(tmp_path))
    path = {"CWD": str(work), "PARENT": str(tmp_path)}.get(given, given)
    for flags in ({"overwrite": True}, {}, {"resume": True}):
        with pytest.raises(RunDirError, match="Expected a directory"):
            RunDir(path, **flags)
    assert snapshot_files(str(tmp_path)) == before


def test_a_non_chief_worker_touches_nothing(tmp_path):
    path = tmp_path / "out"
    _csv(path / "train.csv")
    before = snapshot_files(str(path))
    run_dir = RunDir(str(path), overwrite=True, write=False)
    run_dir.file("history.csv")
    assert snapshot_files(str(path)) == before and sorted(os.listdir(path)) == ["train.csv"]


# === Inputs and the output directory ===


def test_check_inputs(tmp_path):
    output = str(tmp_path / "run")
    data = str(tmp_path / "data")
    RunDir.check_inputs(output, [data, None, output + "-data", str(tmp_path / "run2")])
    for inside in (output, os.path.join(output, "photos"), os.path.join(output, "a", "b.csv")):
        with pytest.raises(RunDirError, match="--output-dir outside your data"):
            RunDir.check_inputs(output, [data, inside])
    with pytest.raises(RunDirError, match="lies inside the input path"):
        RunDir.check_inputs(os.path.join(data, "run"), [data])
    # Compared after resolving links.
    os.makedirs(output)
    os.symlink(output, str(tmp_path / "link"))
    with pytest.raises(RunDirError, match="is the output directory"):
        RunDir.check_inputs(output, [str(tmp_path / "link")])


@pytest.mark.parametrize("flags", [{"overwrite": True}, {}])
def test_image_recipe_refuses_data_inside_the_output_dir_before_writing(tmp_path, flags):
    output = tmp_path / "run"
    data = write_image_folder(str(output / "photos"), {"cat": 3, "dog": 3})
    before = snapshot_files(str(tmp_path))
    config = image_recipe.Config.smoke(data_dir=data, output_dir=str(output), **flags)
    with pytest.raises(RunDirError, match="'photos'"):
        image_recipe.main(config)
    assert snapshot_files(str(tmp_path)) == before
    assert sorted(os.listdir(output)) == ["photos"]


def test_image_recipe_refuses_resuming_a_run_that_holds_the_data(real_run, tmp_path):
    # --resume never deletes, so RunDir.check lets it through; the input check stops it.
    output = _copy(real_run, tmp_path / "run")
    data = write_image_folder(os.path.join(output, "photos"), {"cat": 3, "dog": 3})
    before = snapshot_files(output)
    config = image_recipe.Config.smoke(data_dir=data, output_dir=output, resume=True)
    with pytest.raises(RunDirError, match="lies inside the output directory"):
        image_recipe.main(config)
    assert snapshot_files(output) == before


@pytest.mark.parametrize("flags", [{"overwrite": True}, {}, {"resume": True}])
def test_image_recipe_refuses_the_data_folder_as_the_output_folder(tmp_path, flags):
    data = write_image_folder(str(tmp_path / "photos"), {"cat": 3, "dog": 3})
    before = snapshot_files(data)
    config = image_recipe.Config.smoke(data_dir=data, output_dir=data, **flags)
    with pytest.raises(RunDirError):
        image_recipe.main(config)
    assert snapshot_files(data) == before
    assert sorted(os.listdir(data)) == ["cat", "dog"]  # no checkpoints/ to read as a class


def test_image_recipe_refuses_an_output_dir_inside_the_data(tmp_path):
    data = write_image_folder(str(tmp_path / "photos"), {"cat": 3, "dog": 3})
    config = image_recipe.Config.smoke(data_dir=data, output_dir=os.path.join(data, "run"))
    with pytest.raises(RunDirError, match="lies inside the input path"):
        image_recipe.main(config)
    assert sorted(os.listdir(data)) == ["cat", "dog"]


def test_image_recipe_refuses_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_image_folder(str(tmp_path / "photos"), {"cat": 3, "dog": 3})
    before = snapshot_files(str(tmp_path))
    config = image_recipe.Config.smoke(data_dir=data, output_dir=".", overwrite=True)
    with pytest.raises(RunDirError, match="the current directory"):
        image_recipe.main(config)
    assert snapshot_files(str(tmp_path)) == before


def test_text_recipe_refuses_a_csv_inside_the_output_dir(real_run, tmp_path):
    output = _copy(real_run, tmp_path / "run")
    train = _csv(os.path.join(output, "train.csv"))
    before = snapshot_files(output)
    for flags in ({"overwrite": True}, {"resume": True}):
        config = text_recipe.Config.smoke(train=train, output_dir=output, **flags)
        with pytest.raises(RunDirError, match="train.csv"):
            text_recipe.main(config)
        assert snapshot_files(output) == before


def test_input_paths_of_the_recipes(tmp_path):
    backbone_dir = str(tmp_path / "bert")
    os.makedirs(backbone_dir)
    text = text_recipe.Config(train="a.csv", test="b.jsonl", backbone=backbone_dir)
    assert text.input_paths() == ["a.csv", "b.jsonl", backbone_dir]
    assert text_recipe.Config().input_paths() == []  # the demo data and the minilm-l6 name
    image = image_recipe.Config(data_dir="photos", val_dir="val", weights="w_notop.h5")
    assert image.input_paths() == ["photos", "val", "w_notop.h5"]
    assert image_recipe.Config(weights="none").input_paths() == []


# === Exports ===


def test_export_refuses_an_existing_directory_it_did_not_write(tmp_path):
    _, model = tiny_model()
    target = tmp_path / "served"
    _write(target / "saved_model.pb", "someone else's model")
    _write(target / "notes.txt")
    before = snapshot_files(str(tmp_path))
    with pytest.raises(TfxferError, match="Refusing to export.*Pick another --output path"):
        export_saved_model(model, str(target))
    assert snapshot_files(str(tmp_path)) == before
    assert sorted(os.listdir(tmp_path)) == ["served"]  # no temporary directory left behind


def test_export_refuses_an_existing_file(tmp_path):
    _, model = tiny_model()
    target = _write(tmp_path / "model_out", "a file of mine")
    with pytest.raises(TfxferError, match="already exists as a file"):
        export_saved_model(model, target)
    assert open(target).read() == "a file of mine" and os.listdir(tmp_path) == ["model_out"]


def test_export_replaces_its_own_earlier_export(tmp_path):
    import tensorflow as tf

    target = str(tmp_path / "served")
    images = tf.constant(tiny_arrays(n=2)[0])
    export_saved_model(tiny_model(num_classes=3)[1], target)
    assert tf.saved_model.load(target).serve(images).shape == (2, 3)
    assert os.path.isfile(os.path.join(target, EXPORT_MARKER))
    export_saved_model(tiny_model(num_classes=2)[1], target)
    assert tf.saved_model.load(target).serve(images).shape == (2, 2)
    assert os.listdir(tmp_path) == ["served"]


def test_an_export_removes_what_a_killed_export_left_and_nothing_else(tmp_path):
    import socket
    import subprocess
    import sys

    from tfxfer.export.savedmodel import OWNER_FILE

    host = socket.gethostname()
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])  # its pid is free once it ends
    dead_pid.wait()
    target = str(tmp_path / "export")
    export_saved_model(tiny_model(num_classes=3)[1], target)  # the export a kill interrupted

    def temporary(name: str, owner: dict | None = None, marker: bool = False) -> str:
        path = tmp_path / name
        (path / "variables").mkdir(parents=True)
        if owner is not None:
            (path / OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
        if marker:
            (path / EXPORT_MARKER).parent.mkdir(parents=True)
            (path / EXPORT_MARKER).write_text("{}", encoding="utf-8")
        return name

    killed = temporary(".tmp-export-k1ll3d00", {"pid": dead_pid.pid, "host": host})
    moved_aside = temporary(".tmp-old-export-0ld00000", marker=True)
    live = temporary(".tmp-export-l1ve0000", {"pid": os.getpid(), "host": host})
    elsewhere = temporary(".tmp-export-0th3r000", {"pid": dead_pid.pid, "host": host + "-x"})
    unowned = temporary(".tmp-export-n0wner00")
    other_name = temporary(".tmp-exports-mine0000", {"pid": dead_pid.pid, "host": host})
    # Another export's (`export-v2`) moved-aside copy: not this export's to judge.
    sibling = temporary(".tmp-old-export-v2-0ld00000", marker=True)
    export_saved_model(tiny_model(num_classes=2)[1], target)
    left = set(os.listdir(tmp_path))
    assert killed not in left and moved_aside not in left
    assert {live, elsewhere, unowned, other_name, sibling, "export"} == left
    assert not (tmp_path / "export" / OWNER_FILE).exists()


def test_export_command_refuses_a_foreign_directory(tmp_path, capsys):
    _, model = tiny_model()
    model_path = save_model(model, str(tmp_path / "model.keras"))
    target = tmp_path / "photos"
    _write(target / "cat" / "1.png", "pixels")
    before = snapshot_files(str(target))
    assert cli.main(["export", "--model", model_path, "--output", str(target)]) == 2
    assert "Refusing to export" in capsys.readouterr().err
    assert snapshot_files(str(target)) == before


def test_a_runs_export_is_replaced_when_the_run_finishes_again(real_run, tmp_path):
    # The run's own export/ is in its manifest; a resumed run that finishes again replaces it.
    path = _copy(real_run, tmp_path / "run")
    os.remove(os.path.join(path, "export", EXPORT_MARKER))  # as an export from before markers
    _, model = tiny_model(num_classes=2)
    run_dir = RunDir(path, resume=True)
    export_saved_model(model, run_dir.file("export"))
    assert os.path.isfile(os.path.join(path, "export", EXPORT_MARKER))
    atomic_write_text(run_dir.file("history.csv"), "epoch\n")
    assert set(_manifest(path)) == set(os.listdir(path)) - {MANIFEST}


# === A run that stopped before its first checkpoint ===


class _CrashInFirstBatch(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        raise RuntimeError("the machine went away")


def _tiny_schedule(run_dir, callbacks=()):
    backbone, model = tiny_model()
    images, labels = tiny_arrays(n=12)
    return tfxfer.run_schedule(
        model,
        backbone,
        [tfxfer.Stage("head", 1)],
        tiny_train_data(images, labels),
        run_dir=run_dir,
        callbacks=list(callbacks),
        verbose=0,
    )


def test_a_run_that_crashed_in_its_first_epoch_is_replaced_by_a_plain_rerun(tmp_path, caplog):
    path = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="went away"):
        _tiny_schedule(
            open_run(path, {"seed": 0}, overwrite=False, resume=False), [_CrashInFirstBatch()]
        )
    # A leftover of a first checkpoint that never completed is no checkpoint either.
    os.makedirs(os.path.join(path, "checkpoints", ".tmp-epoch-000001"))
    assert sorted(os.listdir(path)) == [MANIFEST, "checkpoints", "config.json"]

    with caplog.at_level(logging.INFO, logger="tfxfer.rundir"):
        run_dir = open_run(path, {"seed": 1}, overwrite=False, resume=False)
    assert not run_dir.resumed
    assert "stopped before its first checkpoint" in caplog.text
    assert "'checkpoints', 'config.json'" in caplog.text and path in caplog.text
    assert os.listdir(run_dir.checkpoints) == []
    assert json.loads((tmp_path / "run" / "config.json").read_text())["seed"] == 1
    result = _tiny_schedule(run_dir)
    assert [row["epoch"] for row in result.history] == [1]
    assert os.path.isfile(os.path.join(path, "checkpoints", "latest.json"))


@pytest.mark.parametrize(
    "kept",
    ["checkpoints/epoch-000001", "checkpoints/latest.json", "model.keras", "metrics.json", "user"],
)
def test_a_run_without_a_checkpoint_is_kept_when_it_holds_anything_else(tmp_path, kept):
    path = str(tmp_path / "run")
    run_dir = open_run(path, {"seed": 0}, overwrite=False, resume=False)
    if kept == "user":
        _write(os.path.join(path, "notes.txt"))  # not tfxfer's: never replaced unasked
    elif kept.endswith("000001"):
        os.makedirs(os.path.join(path, kept))
    else:
        _write(run_dir.file(kept), "{}")
    before = snapshot_files(path)
    with pytest.raises(RunDirError, match="already holds a run"):
        RunDir(path)
    assert snapshot_files(path) == before


# === File modes ===


def test_every_file_a_run_writes_has_the_mode_open_gives(tmp_path):
    # An unusual umask, so that neither mkstemp's 0o600 nor a hard-coded 0o644 would match.
    previous = os.umask(0o007)
    try:
        path = str(tmp_path / "run")
        backbone, model = tiny_model()
        images, labels = tiny_arrays(n=12)
        val = tiny_val_data(images, labels)
        run_dir = open_run(path, {"seed": 0}, overwrite=False, resume=False)
        result = tfxfer.run_schedule(
            model,
            backbone,
            [tfxfer.Stage("head", 1)],
            tiny_train_data(images, labels),
            val,
            run_dir=run_dir,
            verbose=0,
        )
        finish_run(run_dir, model, result, ["r", "g", "b"], {"val": val}, export_saved_model=True)
        modes, expected, directories = {}, {}, {}
        for root, subdirectories, names in os.walk(path):
            for name in subdirectories:
                full = os.path.join(root, name)
                directories[os.path.relpath(full, path)] = stat.S_IMODE(os.stat(full).st_mode)
            for name in names:
                modes[os.path.relpath(os.path.join(root, name), path)] = stat.S_IMODE(
                    os.stat(os.path.join(root, name)).st_mode
                )
            probe = os.path.join(root, "mode-probe")
            with open(probe, "w", encoding="utf-8"):
                pass
            expected[os.path.relpath(root, path)] = stat.S_IMODE(os.stat(probe).st_mode)
            os.remove(probe)
    finally:
        os.umask(previous)
    assert set(expected.values()) == {0o660}
    # The directories tfxfer makes get what os.makedirs gives under that umask (inside the
    # export, TensorFlow makes its own with 0o755 & ~umask).
    ours = {n: m for n, m in directories.items() if not n.startswith("export" + os.sep)}
    assert "export" in ours and "checkpoints" in ours
    assert set(ours.values()) == {0o770}, ours
    for name in (MANIFEST, "config.json", "history.csv", "metrics.json", "model.keras"):
        assert name in modes, name
    assert any(name.endswith("model.npz") for name in modes)
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != expected[os.path.dirname(name) or "."]
    }
    assert wrong == {}


@pytest.mark.large  # a real second process training for a few seconds
def test_a_second_run_into_a_live_runs_directory_is_refused_in_one_line(
    shapes_dir, tmp_path, capsys
):
    import subprocess
    import sys
    import time

    from helpers import REPO_ROOT

    from tfxfer.runlock import LOCK_FILE

    output = tmp_path / "run"
    flags = [
        "--data-dir", shapes_dir, "--output-dir", str(output), "--weights", "none",
        "--image-size", "32", "--batch-size", "4", "--head-epochs", "1", "--no-export",
        "--verbose", "0",
    ]  # fmt: skip
    first = subprocess.Popen(
        [sys.executable, "-m", "recipes.resnet50_image_classifier", *flags]
        # One fine-tuning epoch of the top group: the lock is held from the run's start to
        # its end, and building, tracing and training MobileNetV3 outlasts the three refusals
        # below by many seconds.
        + ["--backbone", "mobilenetv3small", "--finetune-epochs", "1", "--unfreeze", "1"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (output / LOCK_FILE).exists():
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.1)
        # Started into the same directory while the first trains: refused, whatever the flags,
        # before anything is written or deleted.
        for extra in ([], ["--resume"], ["--overwrite"]):
            config = image_recipe.Config.from_flags([*flags, *extra])
            assert cli.error_boundary(lambda config=config: image_recipe.main(config)) == 2
            error = capsys.readouterr().err
            assert error.count("\n") == 1, error
            assert f"is in use by another run: process {first.pid} on host" in error
        log, _ = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, log
    assert {"metrics.json", "model.keras"} <= set(os.listdir(output))
    assert LOCK_FILE not in os.listdir(output)  # released when the run ended
    history = (output / "history.csv").read_text(encoding="utf-8").splitlines()
    assert len(history) == 1 + 2  # header, head epoch, fine-tuning epoch
