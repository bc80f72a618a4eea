"""`command_line`: how a recipe runs from a shell, `python -m recipes.<name> --flag ...`.

A recipe module ends with

```python
if __name__ == "__main__":
    sys.exit(command_line(main, Config, __doc__))
```

and gets flags from its `Config`'s fields, `--help` from its docstring and field comments,
and `tfxfer.boundary.error_boundary`: exit 0 on success, 2 with one line on bad input.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from tfxfer.boundary import cli_logging, error_boundary
from tfxfer.recipe.config import RecipeConfig

__all__ = ["cli_logging", "command_line"]


def command_line(
    main: Callable[[Any], Any],
    config_cls: type[RecipeConfig],
    description: str | None = None,
    argv: list[str] | None = None,
) -> int:
    """Runs a recipe from the command line: exit 0 on success, 2 with one line on bad input."""
    cli_logging()
    # Under `python -m recipes.x`, say so in usage lines rather than the file's path.
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = f"python -m {spec.name}" if spec is not None and argv is None else None
    config, debug = config_cls.parse_flags(argv, description, prog)
    return error_boundary(lambda: main(config), debug=debug)
