"""Config files and `tfxfer train`: YAML/JSON round trips, --set, the worked examples, errors.

Most tests only read and write configs (no training). Two train a tiny text recipe through
`tfxfer train` to check what only a run shows: a custom `stages` schedule is the one that
trains, and a run's own config.json repeats the run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from bert_helpers import write_hf_checkpoint

from tfxfer import cli
from tfxfer.configfile import (
    SCHEDULE_FIELDS,
    config_from_document,
    known_recipes,
    load_recipe,
    read_document,
    resolve,
    to_yaml,
)
from tfxfer.errors import TfxferError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "recipes" / "configs"


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name", known_recipes())
def test_every_recipe_config_round_trips_through_yaml(name, tmp_path):
    config_cls = load_recipe(name).Config
    for config in (
        config_cls(),
        config_cls(output_dir="runs/x y", seed=3),  # a space, and a non-default int
    ):
        path = write(tmp_path / "c.yaml", to_yaml(config))
        module, loaded = resolve(path)
        assert module.__name__ == f"recipes.{name}"
        assert loaded == config


def test_round_trip_keeps_stages_lists_and_floats(tmp_path):
    module, config = resolve(
        "resnet50_image_classifier",
        ["hidden_units=[64,32]", "head_learning_rate=3e-4", "stages.1.train=2"],
    )
    text = to_yaml(config)
    # The schedule fields that `stages` replaces are not written beside it.
    assert "head_learning_rate" not in text and "stages:" in text
    assert resolve(write(tmp_path / "c.yaml", text))[1] == config
    # The field's comment (its --help) is beside it.
    assert "image_size: 224  # side of the square the backbone sees" in text


def test_worked_examples_cover_every_recipe_and_validate():
    examples = sorted(CONFIGS.glob("*.yaml"))
    covered = {read_document(str(path))["recipe"] for path in examples}
    assert covered == set(known_recipes())
    for path in examples:
        _, config = resolve(str(path))
        config.validate()  # raises naming every bad value


def test_set_edits_one_stage_of_the_default_schedule():
    _, config = resolve("resnet50_image_classifier", ["finetune_learning_rate=2e-5"])
    assert config.stages is None
    _, edited = resolve(
        "resnet50_image_classifier", ["finetune_learning_rate=2e-5", "stages.1.epochs=7"]
    )
    # The flat fields became the schedule, with the one key changed.
    assert [(s.name, s.epochs, s.learning_rate) for s in edited.schedule()] == [
        ("head", None, 1e-3),  # none: the head is solved (Stage.solver)
        ("finetune", 7, 2e-5),
    ]
    assert [s.train for s in edited.schedule()] == [s.train for s in config.schedule()]
    # A stage appended at the end, and list items by index.
    _, more = resolve(
        "recipes/configs/image_classifier.yaml",
        ["stages.3={name: extra, epochs: 1, train: all}", "hidden_units=[8]", "hidden_units.0=16"],
    )
    assert [s.name for s in more.schedule()] == ["head", "top", "all", "extra"]
    assert more.hidden_units == [16]


def test_values_are_typed_like_the_fields():
    _, config = resolve(
        "bert_text_classifier",
        ["head_learning_rate=1e-4", "unfreeze=2", "pooling=null", "multi_label=yes", "seed=4.0"],
    )
    # YAML 1.1 reads 1e-4 (no dot) as a string; the field is a float.
    assert config.head_learning_rate == 1e-4 and isinstance(config.head_learning_rate, float)
    assert config.unfreeze == "2" and config.pooling is None
    assert config.multi_label is True and config.seed == 4 and isinstance(config.seed, int)
    # Dashes as on the command line.
    cls = load_recipe("bert_text_classifier").Config
    assert config_from_document(cls, {"head-epochs": 2}).head_epochs == 2


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["head_epoch=3"], "unknown key 'head_epoch' (did you mean 'head_epochs'?)"),
        (["head_epochs=three"], "head_epochs: expected an integer, got 'three'"),
        (["dropout=[1]"], "dropout: expected a number, got [1]"),
        (["stages.1.epoch=3"], "stages.1: unknown stage key 'epoch' (did you mean 'epochs'?)"),
        (["stages.4.epochs=1"], "'4' is not an index of stages, which has 2 item(s)"),
        (["stages=[{epochs: 1}]"], "stages.0: a stage needs 'name'"),
        (["hidden_units=[8,x]"], "hidden_units.1: expected an integer, got 'x'"),
        (["batch_size"], "is not key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key_path(sets, expected):
    with pytest.raises(TfxferError) as error:
        resolve("resnet50_image_classifier", sets)
    assert expected in str(error.value)


def test_every_problem_is_named_at_once():
    with pytest.raises(TfxferError) as error:
        resolve("resnet50_image_classifier", ["batch_sise=3", "image_size=big"])
    assert "did you mean 'batch_size'" in str(error.value)
    assert "image_size: expected an integer" in str(error.value)


def test_stages_and_the_fields_it_replaces_cannot_both_be_set(tmp_path):
    path = write(
        tmp_path / "c.yaml",
        "recipe: resnet50_image_classifier\nhead_epochs: 2\nstages:\n  - {name: a, epochs: 1}\n",
    )
    with pytest.raises(TfxferError, match="stages and head_epochs are both set"):
        resolve(path)
    assert "head_epochs" in SCHEDULE_FIELDS


def test_invalid_stage_values_are_named_by_validate():
    _, config = resolve(
        "resnet50_image_classifier", ["stages=[{name: a, epochs: 1, optimizer: lion}]"]
    )
    with pytest.raises(TfxferError, match=r"stages\.0: .*optimizer must be one of"):
        config.validate()
    # A stage's rate is a number or "auto"; another word is named by the stage's check.
    _, config = resolve("resnet50_image_classifier", ["stages.1.learning_rate=fast"])
    with pytest.raises(TfxferError, match=r"stages\.1: .*learning_rate must be > 0, got fast"):
        config.validate()


def test_unreadable_config_files_say_where(tmp_path):
    cases = {
        "bad.yaml": ("recipe: x\nhead_epochs: [1,\n", "not valid YAML: line 3"),
        "bad.json": ('{"recipe": "x",\n "seed": }', "not valid JSON: line 2, column 10"),
        "list.yaml": ("- 1\n- 2\n", "holds a list, not a mapping"),
        "norecipe.yaml": ("seed: 1\n", "does not say which recipe"),
    }
    for name, (text, expected) in cases.items():
        with pytest.raises(TfxferError) as error:
            resolve(write(tmp_path / name, text))
        assert expected in str(error.value), name
    with pytest.raises(TfxferError, match="Config file not found"):
        resolve(str(tmp_path / "missing.yaml"))


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(TfxferError) as error:
        resolve("resnet50_image_clasifier")
    message = str(error.value)
    assert "did you mean 'resnet50_image_classifier'" in message
    assert all(name in message for name in known_recipes())
    with pytest.raises(TfxferError, match="is not a recipe"):
        load_recipe("tfxfer.errors")


@pytest.mark.parametrize("recipe", ["../tools/evil", "/tmp/x", ".hidden", "a..b", "3d"])
def test_a_recipe_that_is_no_name_or_module_path_is_one_line_naming_the_known_ones(
    recipe, tmp_path
):
    config = write(tmp_path / "bad.yaml", f"recipe: {recipe}\n")
    with pytest.raises(TfxferError) as error:
        resolve(config)
    message = str(error.value)
    assert "\n" not in message and f"Unknown recipe {recipe!r}" in message
    assert all(name in message for name in known_recipes())
    assert cli.main(["train", config]) == 2


def test_recipes_come_from_entry_points_and_the_built_in_table(monkeypatch):
    import configparser
    import importlib.metadata

    from tfxfer import recipe_index

    # setup.cfg declares exactly the built-in table as entry points.
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    declared = dict(
        line.split("=", 1)
        for line in setup["options.entry_points"][recipe_index.ENTRY_POINT_GROUP].split("\n")
        if line.strip()
    )
    declared = {k.strip(): v.strip() for k, v in declared.items()}
    assert declared == recipe_index.BUILTIN_RECIPES
    # Metadata without them (an install older than the declaration): the table still counts.
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])
    assert known_recipes() == sorted(recipe_index.BUILTIN_RECIPES)
    assert load_recipe("bert_text_classifier").__name__ == "recipes.bert_text_classifier"
    # Another package's entry point adds a recipe (never replacing a built-in one).
    entries = [
        importlib.metadata.EntryPoint("mine", "tfxfer.recipe_index:x", "tfxfer.recipes"),
        importlib.metadata.EntryPoint("bert_text_classifier", "tfxfer.errors", "tfxfer.recipes"),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: entries)
    assert "mine" in known_recipes()
    assert recipe_index.recipe_modules()["bert_text_classifier"] == "recipes.bert_text_classifier"
    with pytest.raises(TfxferError, match="'tfxfer.recipe_index' is not a recipe"):
        load_recipe("mine")
    with pytest.raises(TfxferError, match="Unknown recipe 'mien'.*did you mean 'mine'"):
        load_recipe("mien")


def test_train_command_errors_are_one_line_and_exit_2(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", "recipe: bert_text_classifier\nhead_epochs: lots\n")
    for argv in (["train", "no_such_recipe"], ["train", bad], ["train", bad, "--set", "x"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tfxfer: error: ") and "\n" not in err, argv
    # Flags of another command are still refused by argparse.
    with pytest.raises(SystemExit) as exit_:
        cli.main(["backbones", "--data-dir", "x"])
    assert exit_.value.code == 2


def test_print_config_applies_file_set_and_recipe_flags_in_order(tmp_path, capsys):
    path = write(
        tmp_path / "c.yaml",
        "recipe: bert_text_classifier\nseed: 1\nbatch_size: 4\nhead_epochs: 9\n",
    )
    argv = ["train", path, "--set", "seed=2", "--set", "head_epochs=5", "--print-config"]
    assert cli.main([*argv, "--head-epochs", "6"]) == 0
    printed = capsys.readouterr().out
    _, config = resolve(write(tmp_path / "printed.yaml", printed))
    assert (config.seed, config.batch_size, config.head_epochs) == (2, 4, 6)


# === Through a real (tiny) run ===


@pytest.fixture(scope="module")
def tiny_text_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    write_hf_checkpoint(root / "bert")
    rows = [(f"good fun {i}", "pos") for i in range(10)] + [
        (f"bad dull {i}", "neg") for i in range(10)
    ]
    with open(root / "train.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("text", "label"), *rows])
    text = "\n".join(
        [
            "recipe: bert_text_classifier",
            f"train: {root / 'train.csv'}",
            f"backbone: {root / 'bert'}",
            f"output_dir: {root / 'run'}",
            "sequence_length: 16",
            "batch_size: 8",
            "export: false",
            "stages:",
            "  - {name: head, epochs: 1, learning_rate: 3.0e-3}",
            "  - {name: top, epochs: 1, train: 1, learning_rate: 1.0e-4}",
        ]
    )
    return root, write(root / "config.yaml", text)


@pytest.mark.large
def test_train_runs_the_config_and_its_config_json_repeats_the_run(tiny_text_config, capsys):
    root, path = tiny_text_config
    assert cli.main(["train", path, "--quiet"]) == 0
    # --quiet: no progress, no data or stage lines; the end-of-run summary stays.
    out = capsys.readouterr().out
    assert "Epoch" not in out and "[tfxfer] data:" not in out and "stage 1/2" not in out
    assert "[tfxfer] val: accuracy=" in out and "run saved to" in out
    history = (root / "run" / "history.csv").read_text()
    assert [line.split(",")[1] for line in history.splitlines()[1:]] == ["head", "top"]
    saved = json.loads((root / "run" / "config.json").read_text())
    assert saved["recipe"] == "bert_text_classifier" and saved["quiet"] is True
    # The run's config.json is a config: the same run again, in another directory.
    again = root / "again"
    assert (
        cli.main(["train", str(root / "run" / "config.json"), "--set", f"output_dir={again}"]) == 0
    )
    first = json.loads((root / "run" / "metrics.json").read_text())
    second = json.loads((again / "metrics.json").read_text())
    assert second["val"]["loss"] == pytest.approx(first["val"]["loss"], abs=1e-5)
    assert (again / "history.csv").read_text() == history
    # And a run directory is never replaced by accident.
    assert cli.main(["train", str(root / "run" / "config.json")]) == 2


def test_yaml_anchors_and_merge_keys_still_load(tmp_path):
    from tfxfer.configfile import read_document

    path = tmp_path / "run.yaml"
    path.write_text(
        "recipe: bert_text_classifier\n"
        "x-common: &common {seed: 1, batch_size: 4}\n"
        "stage: {<<: *common, seed: 2}\n",
        encoding="utf-8",
    )
    document = read_document(str(path))
    assert document["stage"] == {"seed": 2, "batch_size": 4}
