"""The top level of `tfxfer` is a small API, the same for images and text; plumbing is not on it."""

import tfxfer

PUBLIC = {
    # Backbones, heads, models.
    "Backbone", "build_backbone", "known_backbones", "HeadConfig", "build_model",
    "build_fusion_model",
    # Data, for images and text alike.
    "LabelledData", "load_images", "load_texts", "make_datasets",
    # Schedules and training.
    "Stage", "default_schedule", "gradual_unfreezing", "run_schedule", "RunDir",
    # Which pretrained backbone suits the data, before training one.
    "rank_backbones",
    # The common case in one object: from data and a backbone to predictions.
    "Classifier",
    # Using the result.
    "load_model", "export_saved_model", "export_tflite",
    "TfxferError",
}  # fmt: skip


def test_the_top_level_is_the_documented_api():
    assert set(tfxfer.__all__) == PUBLIC
    for name in tfxfer.__all__:
        assert getattr(tfxfer, name) is not None, name


def test_plumbing_stays_in_submodules():
    for name in (
        "Session",
        "Distribution",
        "open_run",
        "finish_run",
        "cli_config",
        "run_recipe",
        "validate_config",
        "epoch_batches",
        "loss_and_metrics",
        "apply_stage",
    ):
        assert not hasattr(tfxfer, name), name
    from tfxfer.distribute import Distribution  # noqa: F401
    from tfxfer.recipe import RecipeConfig, command_line, finish_run, open_run, run  # noqa: F401


def test_images_and_text_load_into_the_same_type(shapes_dir):
    from tfxfer.demo_data import demo_text_paths

    images = tfxfer.load_images(shapes_dir, val_split=0.5)
    texts = tfxfer.load_texts(str(demo_text_paths()["train"]), val_split=0.1)
    assert type(images) is type(texts) is tfxfer.LabelledData
    assert (images.kind, texts.kind) == ("image", "text")
    assert set(images.summary()) == set(texts.summary())
