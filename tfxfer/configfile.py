"""Recipe configs as YAML or JSON files, and `key=value` overrides.

`tfxfer train RECIPE_OR_CONFIG [--set key=value ...]` goes through here. A config file is a
mapping of a recipe's `Config` fields, plus `recipe:` (which recipe it configures):

```yaml
recipe: resnet50_image_classifier
data_dir: photos/
backbone: efficientnetv2b0
stages:                 # optional: a schedule of your own instead of head_*/finetune_*
  - {name: head, epochs: 3, learning_rate: 1.0e-3}
  - {name: top, epochs: 2, train: 2, learning_rate: 1.0e-4}
```

Keys are checked against the fields before anything runs: an unknown key says which known
one it resembles, a value of the wrong type names its key path (`stages.1.epochs`) and what
the key takes. A run's own `config.json` is a valid config too (its facts, such as `data` and
`versions`, are skipped), so `tfxfer train runs/a/config.json --set output_dir=runs/b`
repeats run A. `to_yaml` writes a config back with each field's comment beside it. Which
recipe a name or `recipe:` key means is `tfxfer.recipe_index`'s to say (`known_recipes`,
`load_recipe` and `recipe_name` are importable from here too).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from types import ModuleType
from typing import Any

import yaml

from tfxfer.errors import TfxferError, did_you_mean
from tfxfer.flags import field_comments
from tfxfer.recipe_index import known_recipes, load_recipe, recipe_name
from tfxfer.schedule import Stage

# What a run adds to its `config.json` beside the config's fields: facts, not settings.
RUN_FACTS = ("recipe", "data", "backbone_info", "distribution", "versions", "pretraining")

# The fields a custom `stages` list replaces; a config sets one or the other.
SCHEDULE_FIELDS = (
    "head_epochs",
    "head_patience",
    "finetune_epochs",
    "head_learning_rate",
    "finetune_learning_rate",
    "unfreeze",
    "layerwise_lr_decay",
    "regularizer",
    "regularizer_weight",
    "lora_rank",
)

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


# === Reading a config document ===


def is_config_file(target: str) -> bool:
    """Whether `tfxfer train TARGET` names a config file rather than a recipe."""
    return target.lower().endswith(CONFIG_SUFFIXES) or os.path.sep in target


def read_document(path: str) -> dict[str, Any]:
    """The mapping in a YAML or JSON file; a syntax error is reported with its line."""
    if not os.path.exists(path):
        raise TfxferError(f"Config file not found: {path!r}.")
    if os.path.isdir(path):
        raise TfxferError(f"Config {path!r} is a folder. Pass a .yaml or .json config file.")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        raise TfxferError(
            f"Config {path!r} is not text (not UTF-8). Pass a YAML or JSON file."
        ) from None
    if path.lower().endswith(".json"):
        try:
            document = json.loads(text, object_pairs_hook=_unique_keys(path))
        except json.JSONDecodeError as error:
            raise TfxferError(
                f"Config {path!r} is not valid JSON: line {error.lineno}, column {error.colno}: "
                f"{error.msg}."
            ) from None
    else:
        try:
            document = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise TfxferError(f"Config {path!r} is not valid YAML: {where}{problem}.") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise TfxferError(
            f"Config {path!r} holds a {type(document).__name__}, not a mapping of settings "
            "(key: value lines, e.g. `recipe: bert_text_classifier`)."
        )
    return document


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a mapping that gives a key twice is an error: plain YAML
    keeps the last value and drops the first without a word."""

    def construct_mapping(self, node, deep=False):
        seen: dict[tuple[type, Any], int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: merged keys may be given again, that is the point
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool):
                continue
            typed = (type(key), key)  # `1:` and `true:` are two keys
            if typed in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key!r} is given twice (first on line {seen[typed] + 1}); "
                    "remove one of them",
                    key_node.start_mark,
                )
            seen[typed] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _unique_keys(path: str):
    """A `json.loads` hook that refuses an object giving a key twice."""

    def pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for key, value in pairs:
            if key in document:
                raise TfxferError(
                    f"Config {path!r} gives the key {key!r} twice in one object: only the "
                    "last would count. Remove one of them."
                )
            document[key] = value
        return document

    return pairs_to_dict


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """`"stages.1.epochs=3"` -> `(["stages", "1", "epochs"], 3)`; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise TfxferError(
            f"--set {text!r} is not key=value. Write e.g. --set head_epochs=3 or "
            "--set stages.1.learning_rate=1e-4."
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: the plain string
    return [part.strip() for part in key.strip().split(".")], value


def set_path(document: dict[str, Any], path: list[str], value: Any) -> None:
    """Sets `document[path[0]][path[1]]...` to `value`; list items are addressed by index."""
    node: Any = document
    for depth, part in enumerate(path[:-1]):
        following = path[depth + 1]
        if isinstance(node, dict) and node.get(part) is None and following.isdigit():
            where = ".".join(path[: depth + 1])
            raise TfxferError(
                f"--set {'.'.join(path)}: {following!r} is an index, but {where} has no items "
                f"to index here (the config does not set it). Set the whole list instead, e.g. "
                f"--set {where}=[...]."
            )
        node = _child(node, part, path[: depth + 1])
    last = path[-1]
    if isinstance(node, list):
        index = _index(node, last, path, allow_append=True)
        if index == len(node):
            node.append(value)
        else:
            node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise TfxferError(
            f"--set {'.'.join(path)}: {'.'.join(path[:-1])} is {node!r}, not a mapping or list."
        )


def _child(node: Any, part: str, path: list[str]) -> Any:
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            node[part] = {}
        return node[part]
    if isinstance(node, list):
        return node[_index(node, part, path)]
    raise TfxferError(
        f"--set {'.'.join(path)}: {'.'.join(path[:-1])} is {node!r}, not a mapping or list."
    )


def _index(node: list, part: str, path: list[str], allow_append: bool = False) -> int:
    limit = len(node) + (1 if allow_append else 0)
    if not part.lstrip("-").isdigit() or not 0 <= int(part) < limit:
        raise TfxferError(
            f"--set {'.'.join(path)}: {part!r} is not an index of {'.'.join(path[:-1])}, "
            f"which has {len(node)} item(s) (0 to {len(node) - 1})."
        )
    return int(part)


# === From a document to a config ===


def config_from_document(config_cls: type, document: dict[str, Any], source: str = "config") -> Any:
    """The `config_cls` a document describes, every key and value checked first.

    Args:
        config_cls: a recipe's `Config` dataclass.
        document: mapping of field names (dashes or underscores) to values; `RUN_FACTS` keys
            are skipped.
        source: str. Where the document came from, for messages.

    Raises:
        TfxferError: naming every unknown key (with the closest known one) and every value of
            the wrong type, by its key path.
    """
    hints = typing.get_type_hints(config_cls)
    fields = [f.name for f in dataclasses.fields(config_cls)]
    values: dict[str, Any] = {}
    problems: list[str] = []
    for raw_key, value in document.items():
        key = str(raw_key).replace("-", "_")
        if key in RUN_FACTS:
            continue
        if key not in hints or key not in fields:
            problems.append(f"unknown key {raw_key!r}{did_you_mean(key, fields)}")
            continue
        try:
            values[key] = coerce(value, hints[key], key)
        except _WrongType as wrong:
            problems.append(str(wrong))
    given = {str(k).replace("-", "_") for k in document}
    if "stages" in given and document.get("stages") is not None:
        both = [name for name in SCHEDULE_FIELDS if name in given]
        if both:
            problems.append(
                f"stages and {', '.join(both)} are both set (stages is the whole schedule: "
                "give the stages, or the head_*/finetune_* keys, not both)"
            )
    if problems:
        raise TfxferError(f"Invalid {source}: " + "; ".join(problems) + ".")
    return config_cls(**values)


class _WrongType(Exception):
    pass


def coerce(value: Any, hint: Any, path: str) -> Any:
    """`value` as the field type `hint` takes, or `_WrongType` naming `path` and the type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:  # `X | None`: X's own message is the precise one
            return coerce(value, kinds[0], path)
        for kind in kinds:
            try:
                return coerce(value, kind, path)
            except _WrongType:
                continue
        raise _WrongType(f"{path}: expected {_describe(hint)}, got {value!r}")
    if value is None:
        raise _WrongType(f"{path}: expected {_describe(hint)}, got null")
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        if isinstance(value, str) and item is int:  # "256,128", as on the command line
            value = [part for part in value.replace(",", " ").split()]
        elif isinstance(value, str) and item is str:  # "a,b,c", as on the command line
            value = [part.strip() for part in value.split(",") if part.strip()]
        elif not isinstance(value, list):
            value = [value] if item is int else value
        if not isinstance(value, list):
            raise _WrongType(f"{path}: expected {_describe(hint)}, got {value!r}")
        if item is dict or typing.get_origin(item) is dict:
            return [_stage_like(v, f"{path}.{i}") for i, v in enumerate(value)]
        return [coerce(v, item, f"{path}.{i}") for i, v in enumerate(value)]
    return _coerce_scalar(value, hint, path)


def _coerce_scalar(value: Any, hint: Any, path: str) -> Any:
    """`value` as a bool, int, float or str field takes it (any other type: as it is)."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
        if isinstance(value, str) and value.lower() in words:
            return words[value.lower()]
        raise _WrongType(f"{path}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise _WrongType(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise _WrongType(f"{path}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise _WrongType(f"{path}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _WrongType(f"{path}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `unfreeze: 2`
        raise _WrongType(f"{path}: expected a string, got {value!r}")
    return value


def _stage_like(value: Any, path: str) -> dict[str, Any]:
    """One entry of `stages`: a mapping of `tfxfer.Stage` fields, checked and typed."""
    if not isinstance(value, dict):
        raise _WrongType(
            f"{path}: expected a stage mapping (e.g. {{name: head, epochs: 3}}), got {value!r}"
        )
    hints = typing.get_type_hints(Stage)
    out: dict[str, Any] = {}
    for raw_key, item in value.items():
        key = str(raw_key).replace("-", "_")
        if key not in hints:
            raise _WrongType(f"{path}: unknown stage key {raw_key!r}{did_you_mean(key, hints)}")
        if key == "train":  # "head", "all", an int, or a list of group names
            if isinstance(item, bool) or not isinstance(item, (str, int, list)):
                raise _WrongType(
                    f"{path}.train: expected 'head', 'all', a number of groups or a list of "
                    f"group names, got {item!r}"
                )
            out[key] = item
        else:
            out[key] = coerce(item, hints[key], f"{path}.{key}")
    for required in ("name", "epochs"):
        if required not in out:
            raise _WrongType(f"{path}: a stage needs {required!r} (e.g. {{name: head, epochs: 3}})")
    return out


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        if item is dict or typing.get_origin(item) is dict:
            return "a list of stage mappings"
        return f"a list of {names.get(item, str(item)).removeprefix('an ')}s"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        text = " or ".join(_describe(a) for a in args)
        return text + (" or null" if type(None) in typing.get_args(hint) else "")
    return names.get(hint, getattr(hint, "__name__", str(hint)))


# === Writing a config ===


def to_document(config: Any) -> dict[str, Any]:
    """The config as a plain mapping: `recipe`, the recipe's own fields, then the shared ones.

    With `stages` set, the head_*/finetune_* fields it replaces are left out.
    """
    values = dataclasses.asdict(config)
    own = [
        f.name
        for f in dataclasses.fields(config)
        if f.name in vars(type(config)).get("__annotations__", {})
    ]
    order = own + [name for name in values if name not in own]
    skip = SCHEDULE_FIELDS if values.get("stages") is not None else ()
    return {
        "recipe": recipe_name(type(config)),
        **{name: values[name] for name in order if name not in skip},
    }


def to_yaml(config: Any) -> str:
    """The config as YAML, each field's comment (its `--help`) beside it; loads back equal."""

    def dump(value: Any) -> str:
        return yaml.safe_dump(
            value, default_flow_style=True, sort_keys=False, allow_unicode=True, width=10_000
        ).strip()

    comments = field_comments(type(config))
    name = recipe_name(type(config))
    lines = [f"# tfxfer config for the {name} recipe: tfxfer train this.yaml [--set key=value]"]
    for key, value in to_document(config).items():
        comment = comments.get(key, "")
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            if comment:
                lines.append(f"# {key}: {comment}")
            lines.append(f"{key}:")
            lines += [f"  - {dump(item)}" for item in value]
            continue
        text = dump(value)
        if text.endswith("\n..."):  # how PyYAML ends a lone scalar
            text = text[: -len("\n...")]
        text = text.removesuffix("...").strip()
        line = f"{key}: {text}"
        lines.append(f"{line}  # {comment}" if comment else line)
    return "\n".join(lines) + "\n"


# === What `tfxfer train` runs ===


def resolve(target: str, assignments: list[str] = ()) -> tuple[ModuleType, Any]:
    """The recipe module and its config from `tfxfer train TARGET --set ...`.

    Args:
        target: str. A recipe name (`bert_text_classifier`), a module path, or a YAML/JSON
            config file (its `recipe:` key names the recipe).
        assignments: `key=value` strings, applied in order on top of the file.
    """
    if is_config_file(target):
        document = read_document(target)
        recipe = document.get("recipe")
        if not recipe:
            raise TfxferError(
                f"Config {target!r} does not say which recipe it is for: add a line "
                f"`recipe: NAME` (one of {', '.join(known_recipes())})."
            )
        source = f"config {target!r}"
    else:
        document, recipe, source = {}, target, f"--set for recipe {target!r}"
    module = load_recipe(str(recipe))
    for text in assignments:
        path, value = parse_assignment(text)
        key = path[0].replace("-", "_")
        if key == "stages" and len(path) > 1 and document.get("stages") is None:
            # Editing one stage of the schedule the flat fields describe: write it out first.
            base = config_from_document(module.Config, document, source)
            document = {k: v for k, v in document.items() if k not in SCHEDULE_FIELDS}
            document["stages"] = stage_documents(base)
        set_path(document, [key, *path[1:]], value)
    return module, config_from_document(module.Config, document, source)


def stage_documents(config: Any) -> list[dict[str, Any]]:
    """The config's schedule as `stages` entries: each stage's fields that are not defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(Stage)}
    return [
        {
            k: v
            for k, v in dataclasses.asdict(stage).items()
            if k in ("name", "epochs") or v != defaults[k]
        }
        for stage in config.schedule()
    ]


def stage_problems(stages: Any) -> list[str]:
    """What is wrong with a config's `stages` list, each problem named by its key path."""
    try:
        documents = coerce(stages, list[dict], "stages")
    except _WrongType as wrong:
        return [str(wrong)]
    if not documents:
        return ["stages=[] (expected at least one stage, or none for the two-stage default)"]
    found = []
    for index, document in enumerate(documents):
        try:
            Stage(**document).validate()
        except TfxferError as error:
            found.append(f"stages.{index}: {error}".rstrip("."))
    names = [document["name"] for document in documents]
    if len(set(names)) != len(names):
        found.append(f"stages: names must be unique (they key the history), got {names}")
    return found


def stage_documents_to_stages(stages: list[dict[str, Any]]) -> list:
    """`tfxfer.Stage` objects from checked `stages` entries."""
    return [Stage(**document) for document in coerce(stages, list[dict], "stages")]
