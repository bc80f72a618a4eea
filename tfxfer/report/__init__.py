"""What a user reads after a run: metrics, the pictures and tables, TensorBoard, a summary.

`metrics` computes from every prediction at once, `tables` and `plots` write the files,
`tensorboard` logs each epoch, and `writing` puts a finished run's reports together.
"""

from tfxfer.report.metrics import (
    class_ids,
    classification_metrics,
    collect,
    example_losses,
    json_safe,
    roc_auc,
    summary_line,
)
from tfxfer.report.plots import (
    MAX_LABEL_CHARS,
    plot_confusion_matrix,
    plot_top_losses,
    plot_training_curves,
    shorten,
)
from tfxfer.report.tables import (
    TOP_LOSS_COLUMNS,
    TOP_LOSSES,
    top_losses,
    write_csv,
    write_per_class,
)
from tfxfer.report.tensorboard import TensorBoardLogger, tensorboard_callbacks
from tfxfer.report.writing import TOP_LOSS_IMAGES, run_summary, weakest_classes, write_reports

__all__ = [
    "MAX_LABEL_CHARS",
    "TOP_LOSSES",
    "TOP_LOSS_COLUMNS",
    "TOP_LOSS_IMAGES",
    "TensorBoardLogger",
    "class_ids",
    "classification_metrics",
    "collect",
    "example_losses",
    "json_safe",
    "plot_confusion_matrix",
    "plot_top_losses",
    "plot_training_curves",
    "roc_auc",
    "run_summary",
    "shorten",
    "summary_line",
    "tensorboard_callbacks",
    "top_losses",
    "weakest_classes",
    "write_csv",
    "write_per_class",
    "write_reports",
]
