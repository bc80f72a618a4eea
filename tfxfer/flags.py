"""Command-line flags from a config dataclass: one flag per field, `--help` from its comment.

A recipe's flags are its `Config` fields (`image_size` becomes `--image-size`), so flags and
fields never drift apart; the comment after each field in the class body is the flag's help,
so the help is written once, where the field is. An optional field (`str | None`) takes
`none` on the command line. `--debug` (tracebacks for unexpected errors) is added to every
parser without being a field.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from collections.abc import Callable
from typing import Any

import yaml

from tfxfer.boundary import DEBUG_HELP, OneLineParser


def parse_flags(
    config_cls: type,
    argv: list[str] | None = None,
    description: str | None = None,
    prog: str | None = None,
    shared_fields: typing.Collection[str] = (),
    defaults: Any = None,
) -> tuple[Any, bool]:
    """Parses `argv` into a `config_cls`, one flag per field, the field's comment as help.

    Args:
        config_cls: a dataclass whose every field has a default.
        argv: list[str] or None. Defaults to `sys.argv[1:]`.
        description: str or None. First line: the summary; the rest: shown after the flags.
            Defaults to the class docstring.
        prog: str or None. The program name in usage lines.
        shared_fields: the fields every recipe has; listed after the class's own in `--help`.
        defaults: a `config_cls` whose values are the flags' defaults (a config file's).
            Defaults to `config_cls()`.

    Returns:
        The config, and whether `--debug` was given.
    """
    summary, _, details = (description or config_cls.__doc__ or "").strip().partition("\n")
    parser = OneLineParser(
        prog=prog,
        description=summary,
        epilog=textwrap.dedent(details).strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(config_cls)
    defaults = config_cls() if defaults is None else defaults
    comments = field_comments(config_cls)
    shared = set(shared_fields)
    own = parser.add_argument_group("recipe options")
    common = parser.add_argument_group("training and run options (every recipe)")
    fields = dataclasses.fields(config_cls)
    for item in sorted(fields, key=lambda f: f.name in shared):
        _add_field_flag(
            common if item.name in shared else own,
            item.name,
            hint=hints[item.name],
            default=getattr(defaults, item.name),
            comment=comments.get(item.name),
        )
    if "debug" not in {f.name for f in fields}:
        parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)
    config = config_cls(**{f.name: getattr(args, f.name) for f in fields})
    return config, bool(getattr(args, "debug", False))


def _add_field_flag(group, name: str, *, hint: Any, default: Any, comment: str | None) -> None:
    """Adds the flag of the field `name` (`--image-size` for `image_size`) to `group`."""
    flag = "--" + name.replace("_", "-")
    kinds = typing.get_args(hint) or (hint,)
    help_text = f"{comment or ''} (default: {default})".strip()
    if hint is bool:
        group.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=default, help=comment
        )
    elif dict in [typing.get_args(k)[0] for k in kinds if typing.get_origin(k) is list]:
        group.add_argument(flag, type=_json_stages, default=default, metavar="JSON", help=help_text)
    elif typing.get_origin(hint) is list and typing.get_args(hint) == (str,):
        group.add_argument(
            flag, type=_list_of_words, default=default, metavar="A,B", help=help_text
        )
    elif typing.get_origin(hint) is list:
        group.add_argument(flag, type=_list_of_ints, default=default, metavar="N,N", help=help_text)
    elif str in kinds and (float in kinds or int in kinds):  # a number, or a word ("auto")
        number = float if float in kinds else int
        group.add_argument(flag, type=_number_or_word(number), default=default, help=help_text)
    else:
        kind = next((k for k in (int, float) if k in kinds), str)
        group.add_argument(flag, type=_optional(kind, hint), default=default, help=help_text)


class FlagConfig:
    """What a recipe config base (`RecipeConfig`, `PretrainConfig`) gets from its fields.

    `smoke()` (the base's `SMOKE_SETTINGS`, then the recipe's `SMOKE`, then the caller's),
    and flags parsed into the config, with the base's own fields listed after the recipe's in
    `--help`. The base is the class just before this one in the method resolution order.
    """

    # Tiny settings every recipe of the base uses in tests, and a recipe's own on top.
    SMOKE_SETTINGS: typing.ClassVar[dict[str, Any]] = {}
    SMOKE: typing.ClassVar[dict[str, Any]] = {}

    def checker(self, found: list[str]) -> Callable[[str, Callable[[Any], bool], str], None]:
        """`check(name, ok, expected)`: appends "name=value (expected ...)" to `found` when a
        set field's value is not `ok`; what every config's `problems()` is made of."""

        def check(name: str, ok: Callable[[Any], bool], expected: str) -> None:
            value = getattr(self, name, None)
            if value is not None and not ok(value):
                found.append(f"{name}={value!r} (expected {expected})")

        return check

    def fit_verbosity(self) -> int:
        """Keras `fit`'s verbose: 0 when quiet; unset, a progress bar with ETA on a terminal
        and one line per epoch otherwise (a log file has no use for a redrawn bar)."""
        if getattr(self, "quiet", False):
            return 0
        verbose = getattr(self, "verbose", None)
        if verbose is not None:
            return int(verbose)
        isatty = getattr(sys.stdout, "isatty", None)
        return 1 if isatty is not None and isatty() else 2

    @classmethod
    def smoke(cls, **fields: Any):
        """Tiny settings for tests (`SMOKE_SETTINGS`, the recipe's `SMOKE`, then `fields`)."""
        return cls(**{**cls.SMOKE_SETTINGS, **cls.SMOKE, **fields})

    @classmethod
    def from_flags(cls, argv: list[str] | None = None, description: str | None = None):
        """Parses command-line flags (one per field, `--help` from field comments)."""
        return cls.parse_flags(argv, description)[0]

    @classmethod
    def parse_flags(cls, argv=None, description=None, prog=None, defaults=None) -> tuple[Any, bool]:
        """The config from command-line flags (on top of `defaults`), and whether `--debug`
        was given."""
        base = cls.__mro__[cls.__mro__.index(FlagConfig) - 1]
        shared = [f.name for f in dataclasses.fields(base)]
        return parse_flags(cls, argv, description, prog, shared_fields=shared, defaults=defaults)


def _list_of_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _list_of_words(text: str) -> list[str]:
    """`a,b,c` as a list; empty parts dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _number_or_word(number: type) -> Callable[[str], float | int | str]:
    """A flag parser: `number(text)` where the text is one, else the word itself."""

    def parse(text: str) -> float | int | str:
        try:
            return number(text)
        except ValueError:
            return text.strip()

    return parse


def _json_stages(text: str) -> list[dict] | None:
    """`--stages '[{"name": "head", "epochs": 3}, ...]'` (JSON or YAML; "none" for none)."""
    if text.strip().lower() == "none":
        return None
    try:
        value = yaml.safe_load(text)  # YAML reads JSON too
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"expected a JSON list of stages, got {text!r}") from None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a JSON list of stages, got {text!r}")
    return value


def _optional(kind: type, hint: Any) -> Callable[[str], Any]:
    """A flag parser for `kind`; for an optional field, "none" (any case) gives None."""
    optional = type(None) in typing.get_args(hint)

    def parse(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def field_comments(config_cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in the class bodies of `config_cls` and its bases.

    A subclass's comment wins over its base's. Without source (a frozen app), no help.
    """
    comments: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines, _ = inspect.getsourcelines(klass)
        except (OSError, TypeError):
            continue
        source = textwrap.dedent("".join(lines))
        body = ast.parse(source).body[0]
        source_lines = source.splitlines()
        for node in getattr(body, "body", []):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                line = source_lines[node.end_lineno - 1]
                comment = _trailing_comment(line)
                if comment:
                    comments[node.target.id] = comment
    return comments


def _trailing_comment(line: str) -> str:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return ""
    return next((t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT), "")
