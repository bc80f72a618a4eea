"""`tfxfer rank`, `tfxfer.rank_backbones` and `--backbone auto`, end to end on tiny images.

The scores themselves are `test_transferability.py`'s; here: every candidate is built as a
run builds it and scored on its frozen features, a candidate that cannot be built is listed
with its reason while the others are ranked, the outputs (table, --json, rank.json,
rank.png) and their folder's rules, and a run with `--backbone auto` fine-tunes the winner
and records the ranking.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

import tfxfer
from tfxfer.cli import main as tfxfer_command

TEXT_BACKBONE = "minilm-l6"  # a text backbone: no image recipe can build it


def _settings(shapes_dir, tmp_path, *more):
    settings = [
        f"data_dir={shapes_dir}",
        f"output_dir={tmp_path / 'run'}",
        "image_size=32",
        "weights=none",
        "augment=false",
        "batch_size=8",
    ]
    return [*settings, *more]


def test_rank_scores_every_candidate_and_lists_one_that_fails(
    shapes_dir, tmp_path, tiny_backbones, capsys
):
    candidates = ",".join([*tiny_backbones, TEXT_BACKBONE])
    argv = ["rank", "resnet50_image_classifier", "--candidates", candidates]
    for setting in _settings(shapes_dir, tmp_path):
        argv += ["--set", setting]

    assert tfxfer_command(argv) == 0

    out = capsys.readouterr().out
    assert "rank  candidate" in out and "logme" in out
    assert f"{TEXT_BACKBONE}: Candidate '{TEXT_BACKBONE}': backbone='{TEXT_BACKBONE}'" in out
    folder = tmp_path / "run-rank"
    ranking = json.loads((folder / "rank.json").read_text())
    assert (folder / "rank.png").stat().st_size > 1000
    rows = ranking["candidates"]
    assert [r["backbone"] for r in rows[:2]] != [] and rows[-1]["backbone"] == TEXT_BACKBONE
    scored = rows[:2]
    assert sorted(r["backbone"] for r in scored) == tiny_backbones
    assert [r["rank"] for r in scored] == [1, 2] and scored[0]["score"] >= scored[1]["score"]
    assert ranking["best"] == scored[0]["backbone"] and ranking["metric"] == "logme"
    for row in scored:
        assert row["examples"] == 15 and row["feature_width"] > 0 and row["seconds"] > 0
    assert rows[-1]["rank"] is None and "takes text" in rows[-1]["error"]

    # Again into the same folder: refused, nothing replaced, until --overwrite.
    before = (folder / "rank.json").read_bytes()
    assert tfxfer_command([*argv, "--metric", "hscore"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (folder / "rank.json").read_bytes() == before
    assert tfxfer_command([*argv, "--metric", "hscore", "--overwrite", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["backbone"] for line in lines][-1] == TEXT_BACKBONE
    assert {"backbone", "score", "rank", "seconds"} <= set(lines[0])
    assert json.loads((folder / "rank.json").read_text())["metric"] == "hscore"


def test_rank_backbones_in_python_leaves_a_users_file_alone(shapes_dir, tmp_path, tiny_backbones):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(tfxfer.TfxferError):
        tfxfer.rank_backbones(
            "resnet50_image_classifier",
            tiny_backbones,
            settings=_settings(shapes_dir, tmp_path),
            output_dir=str(folder),
            overwrite=True,
        )
    assert os.listdir(folder) == ["notes.txt"]
    ranking = tfxfer.rank_backbones(
        "resnet50_image_classifier",
        tiny_backbones[:1],
        settings=_settings(shapes_dir, tmp_path),
        write=False,
    )
    assert ranking["best"] == tiny_backbones[0] and ranking["output_dir"] is None


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--candidates", " , "], "No candidates to rank"),
        (["--candidates", "a,a"], "names a more than once"),
        (["--candidates", "tinynet", "--metric", "nce"], "Unknown --metric 'nce'"),
    ],
)
def test_rank_refuses_an_empty_list_or_an_unknown_metric_in_one_line(
    shapes_dir, tmp_path, tiny_backbones, capsys, extra, words
):
    argv = ["rank", "resnet50_image_classifier", *extra]
    for setting in _settings(shapes_dir, tmp_path):
        argv += ["--set", setting]
    assert tfxfer_command(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_backbone_auto_fine_tunes_the_top_ranked_candidate(shapes_dir, tmp_path, tiny_backbones):
    from recipes import resnet50_image_classifier as recipe

    config = recipe.Config.smoke(
        data_dir=shapes_dir,
        output_dir=str(tmp_path / "run"),
        backbone="auto",
        candidates=[*tiny_backbones, TEXT_BACKBONE],
    )
    result = recipe.main(config)

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    ranking = metrics["ranking"]
    assert ranking["best"] in tiny_backbones and ranking["seconds"] > 0
    assert len(ranking["candidates"]) == 3 and "error" in ranking["candidates"][-1]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["backbone"] == ranking["best"] and saved["candidates"] == []
    assert saved["ranking"]["best"] == ranking["best"]
    assert result["backbone"].name == ranking["best"]


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"backbone": "auto"}, "backbone='auto' (expected --candidates a,b,c"),
        ({"candidates": ["resnet50"]}, "ranked only with --backbone auto"),
        ({"backbone": "auto", "candidates": ["a"], "rank_metric": "nce"}, "rank_metric='nce'"),
    ],
)
def test_auto_settings_are_checked_before_anything_runs(changes, words):
    from recipes import resnet50_image_classifier as recipe

    problems = recipe.Config(data_dir="x", **changes).problems()
    assert any(words in p for p in problems), problems


def test_classifier_ranks_and_fine_tunes_the_winner_with_backbone_auto(
    shapes_dir, tmp_path, tiny_backbones
):
    options = {"image_size": 32, "weights": "none", "augment": False, "batch_size": 8}
    plain = tfxfer.Classifier.from_folder(
        shapes_dir, tiny_backbones[0], output_dir=str(tmp_path / "a"), **options
    )
    ranking = plain.rank(tiny_backbones)
    assert {r["backbone"] for r in ranking["candidates"]} == set(tiny_backbones)
    assert not (tmp_path / "a").exists()  # rank writes nothing

    auto = tfxfer.Classifier.from_folder(
        shapes_dir, "auto", candidates=tiny_backbones, output_dir=str(tmp_path / "b"), **options
    )
    metrics = auto.fine_tune(head_epochs=1, finetune_epochs=1, verbose=0, export=False)
    assert metrics["ranking"]["best"] == ranking["best"]
    assert auto.backbone.name == ranking["best"]


def test_candidate_names_weights_and_paths_with_an_at_sign(tmp_path):
    from recipes import bert_text_classifier as text_recipe
    from recipes import resnet50_image_classifier as recipe
    from tfxfer.recipe.rank import candidate_config

    image = recipe.Config(data_dir="x")
    assert candidate_config(image, "resnet50@none").weights == "none"
    assert candidate_config(image, "resnet50").weights == "imagenet"
    text = text_recipe.Config()
    assert candidate_config(text, "minilm-l6:layers=2@none").pretrained is False
    assert candidate_config(text, "minilm-l6:layers=2").backbone == "minilm-l6:layers=2"
    folder = tmp_path / "bert@v2"
    folder.mkdir()
    assert candidate_config(text, str(folder)).backbone == str(folder)  # not split at '@'
    with pytest.raises(tfxfer.TfxferError, match="nothing after '@'"):
        candidate_config(image, "resnet50@")
    with pytest.raises(tfxfer.TfxferError, match="takes no weights after '@' but 'none'"):
        candidate_config(text, "minilm-l6@imagenet")


def test_json_output_exits_2_when_no_candidate_could_be_ranked(shapes_dir, tmp_path, capsys):
    argv = ["rank", "resnet50_image_classifier", "--candidates", TEXT_BACKBONE, "--json"]
    for setting in _settings(shapes_dir, tmp_path):
        argv += ["--set", setting]
    assert tfxfer_command(argv) == 2
    captured = capsys.readouterr()
    (line,) = captured.out.splitlines()
    assert json.loads(line)["rank"] is None and "takes text" in json.loads(line)["error"]
    assert captured.err.strip().startswith("tfxfer: error: No candidate backbone could be ranked")


def test_auto_reseeds_after_ranking_and_a_resumed_run_keeps_its_winner(
    shapes_dir, tmp_path, tiny_backbones
):
    import keras
    import numpy as np

    from recipes import resnet50_image_classifier as recipe
    from tfxfer.distribute import Distribution
    from tfxfer.recipe.rank import choose_backbone

    config = recipe.Config.smoke(
        data_dir=shapes_dir,
        output_dir=str(tmp_path / "run"),
        backbone="auto",
        candidates=tiny_backbones,
        quiet=True,
    )
    distribution = Distribution("cpu", "float32", 8, False)
    chosen, _, ranking = choose_backbone(
        config, recipe.build_data, recipe.build_model, distribution
    )
    after_ranking = np.random.rand()
    keras.utils.set_random_seed(config.seed)
    assert after_ranking == np.random.rand()  # the winner starts from the seed
    assert chosen.backbone == ranking["best"]

    # Resumed: the winner config.json recorded, whatever ranking would say now.
    (tmp_path / "run").mkdir()
    other = next(b for b in tiny_backbones if b != ranking["best"])
    recorded = {**ranking, "best": other}
    (tmp_path / "run" / "config.json").write_text(json.dumps({"ranking": recorded}))

    def must_not_build(config, data):
        raise AssertionError("a resumed run must not rank again")

    resumed = dataclasses.replace(config, resume=True)
    chosen, _, ranking = choose_backbone(resumed, recipe.build_data, must_not_build, distribution)
    assert chosen.backbone == other and ranking["best"] == other


def test_a_users_own_rank_json_is_never_replaced(shapes_dir, tmp_path, tiny_backbones, capsys):
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "rank.json").write_text('{"my": "ranking"}')
    argv = ["rank", "resnet50_image_classifier", "--candidates", tiny_backbones[0]]
    argv += ["--output", str(folder), "--overwrite"]
    for setting in _settings(shapes_dir, tmp_path):
        argv += ["--set", setting]
    assert tfxfer_command(argv) == 2
    assert "holds files rank did not write (rank.json)" in capsys.readouterr().err
    assert (folder / "rank.json").read_text() == '{"my": "ranking"}'
