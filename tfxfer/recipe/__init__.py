"""The recipe skeleton: the config fields every recipe shares, and the one way a recipe runs.

A recipe is a story of three parts: its own config fields, how it loads its data, and how it
builds its model. Everything else is the same for every recipe and lives here, in this order:
check the config and the output directory (cheap, before minutes go into a backbone) -> seed
-> distribution scope -> data -> model -> schedule -> run directory -> train -> evaluate ->
save and export. A new recipe subclasses `RecipeConfig` and calls `run`:

```python
@dataclass
class Config(RecipeConfig):
    data_dir: str | None = None  # one subfolder per class

def build_data(config: Config) -> LabelledData:
    return load_data(config, config.data_dir)

def build_model(config: Config, data: LabelledData):
    return build_task_model(config, data)

def main(config: Config) -> dict:
    return run(config, build_data, build_model)

if __name__ == "__main__":
    sys.exit(command_line(main, Config, __doc__))
```

Flags come from the fields (`image_size` becomes `--image-size`) and `--help` text from the
comment after each field (`tfxfer.flags`), so flags, defaults and help never drift apart.

Modules: `config` (`RecipeConfig` and its checks), `task` (the one task builder: data,
backbones, head, model; `tfxfer.Classifier` uses it too), `start` (what a run does before it
trains), `runner` (`run`), `finish` (`finish_run`), `lr_find` (the `lr-find` command) and
`command` (`command_line`).
"""

from tfxfer.recipe.command import cli_logging, command_line
from tfxfer.recipe.config import (
    MAX_IMAGE_SIZE,
    SMOKE_SETTINGS,
    RecipeConfig,
    output_dir_problem,
)
from tfxfer.recipe.finish import finish_run
from tfxfer.recipe.lr_find import find_learning_rate
from tfxfer.recipe.runner import run
from tfxfer.recipe.start import (
    BuildData,
    BuildModel,
    backbone_info,
    keeping_dtype_policy,
    open_run,
    randomly_initialised,
    start_run,
    uneven_first_batch,
)
from tfxfer.recipe.task import (
    build_backbones,
    build_classifier,
    build_task_model,
    load_data,
    wants_source_head,
)

__all__ = [
    "MAX_IMAGE_SIZE",
    "SMOKE_SETTINGS",
    "BuildData",
    "BuildModel",
    "RecipeConfig",
    "backbone_info",
    "build_backbones",
    "build_classifier",
    "build_task_model",
    "cli_logging",
    "command_line",
    "find_learning_rate",
    "finish_run",
    "keeping_dtype_policy",
    "load_data",
    "open_run",
    "output_dir_problem",
    "randomly_initialised",
    "run",
    "start_run",
    "uneven_first_batch",
    "wants_source_head",
]
