"""Which recipes there are, and the module of each: how `tfxfer train NAME` finds a recipe.

A recipe is a module with a `Config` dataclass and a `main(config)` function. The recipes
tfxfer ships are listed in `BUILTIN_RECIPES`, name to module. Another package adds its own
by declaring an entry point in the `tfxfer.recipes` group, for instance in its setup.cfg:

```ini
[options.entry_points]
tfxfer.recipes =
    my_recipe = my_package.my_recipe
```

tfxfer's own setup.cfg declares the built-in ones the same way; the table is what is used
where the installed metadata lacks them (a source checkout, an editable install made before
they were declared). A dotted module path (`my_package.my_recipe`) is taken too, without any
declaration. Anything else, such as a path (`../tools/x`), is refused in one line that names
the known recipes.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from types import ModuleType

from tfxfer.errors import TfxferError, did_you_mean

# The entry-point group a package declares its recipes in.
ENTRY_POINT_GROUP = "tfxfer.recipes"

# The recipes tfxfer ships: name -> module. setup.cfg declares the same as entry points.
BUILTIN_RECIPES = {
    "bert_mlm_pretrain": "recipes.bert_mlm_pretrain",
    "bert_text_classifier": "recipes.bert_text_classifier",
    "contrastive_image_pretrain": "recipes.contrastive_image_pretrain",
    "resnet50_image_classifier": "recipes.resnet50_image_classifier",
}

# How a config file may be named instead of a recipe (for the messages).
_CONFIG_SUFFIXES = ".yaml/.yml/.json"


def recipe_modules() -> dict[str, str]:
    """Every known recipe, name -> module: the built-in ones, then installed entry points.

    An entry point of another package may add a name; it never replaces a built-in one.
    """
    modules = dict(BUILTIN_RECIPES)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        modules.setdefault(entry.name, entry.value.partition(":")[0].strip())
    return modules


def known_recipes() -> list[str]:
    """The names of the known recipes (see `recipe_modules`), sorted."""
    return sorted(recipe_modules())


def _is_module_path(name: str) -> bool:
    return "." in name and all(part.isidentifier() for part in name.split("."))


def load_recipe(name: str) -> ModuleType:
    """The recipe module `name`: a known recipe's name, or a dotted module path.

    Raises:
        TfxferError: no such recipe (the known ones are listed, the closest first), or the
            module is not a recipe (it has no `Config` and `main`).
    """
    modules = recipe_modules()
    known = sorted(modules)
    if name not in modules and not _is_module_path(name):
        raise TfxferError(
            f"Unknown recipe {name!r}{did_you_mean(name, known)}. Known recipes: "
            f"{', '.join(known) or 'none found'}; or pass a config file "
            f"({_CONFIG_SUFFIXES}), or a module path such as my_package.my_recipe."
        )
    module_name = modules.get(name, name)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise TfxferError(
                f"Unknown recipe {name!r}: no module {module_name!r} can be imported. Known "
                f"recipes: {', '.join(known)}."
            ) from None
        raise
    if not (hasattr(module, "Config") and callable(getattr(module, "main", None))):
        raise TfxferError(
            f"{module_name!r} is not a recipe: a recipe module has a `Config` dataclass and a "
            "`main(config)` function (see recipes/ and tfxfer.recipe)."
        )
    return module


def recipe_name(config_cls: type) -> str:
    """The name `tfxfer train` finds the recipe of `config_cls` by, as `config.json` records it.

    A known recipe's name, else its module path (which `load_recipe` takes as well).
    """
    module = config_cls.__module__
    if module == "__main__":  # `python -m recipes.x`: the module's real name is in its spec
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else module
    names = {path: name for name, path in reversed(recipe_modules().items())}
    return names.get(module, module)
