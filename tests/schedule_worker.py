"""A real two-stage tfxfer run in a process of its own, for the kill-and-resume tests.

Resuming after a kill can only be tested with a process that really dies: a `SIGKILL`
leaves no chance to flush, close or clean up, which an exception raised inside `fit` does.
This program trains a tiny dense model through the same path a recipe takes
(`Distribution`, `open_run`, `run_schedule`, `finish_run`), in one process or as one
worker of a `MultiWorkerMirroredStrategy` cluster (launch it with `multiworker_helpers`):

    python tests/schedule_worker.py --run-dir RUN --out OUT [--strategy cpu] [--resume]

and writes what it ended with to `OUT/worker<i>.npz` (final weights) and
`OUT/worker<i>.json` (history, metrics, which epoch it resumed after, and every file
operation it made inside the run directory). Errors a user would see (`TfxferError`) are
printed as `tfxfer: error: ...` with exit status 2, as the recipes do.

To kill it at an exact moment without sleeping, it can stop and wait to be killed, as a
machine about to be preempted would (the test then kills it once the marker it prints and
the checkpoint it expects are both there):

- `--block-at E:B`: after batch B of global epoch E (both from 1): mid-epoch, so weights in
  memory have moved past the last checkpoint.
- `--block-in-save E`: inside the checkpoint write of epoch E, after its `state.json` is
  written but before the directory is renamed into place, leaving a complete-looking
  `.tmp-epoch-*` directory.
- `--block-before-history E`: after the checkpoint of epoch E is complete, before
  `history.csv` has that epoch's row.
- `--sigterm-at E:B`: sends itself SIGTERM (or `--sigterm-signal SIGINT`, a Ctrl-C) after
  batch B of global epoch E, a preemption
  notice the run answers with a mid-epoch checkpoint (`tests/preemption_worker.py` runs this
  program behind the command line's error boundary, for its exit status and message).

In `--block-at` and `--sigterm-at`, B counts the batches this process ran in epoch E: a run
resumed from a checkpoint S steps into epoch E reaches its step S + B there.

The model is deterministic (fixed data and seeds, no dropout, no BatchNorm), so a resumed
run must end with the weights of a run that was never killed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

THIS_FILE = Path(__file__).resolve()
NUM_FEATURES = 8
NUM_CLASSES = 3
CLASS_NAMES = ["a", "b", "c"]
GROUPS = ("low", "mid", "top")


def example_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed, learnable data: the class is the arg-max of three fixed projections."""
    rng = np.random.RandomState(seed)
    x = rng.randn(n, NUM_FEATURES).astype("float32")
    projections = np.random.RandomState(123).randn(NUM_FEATURES, NUM_CLASSES)
    return x, (x @ projections).argmax(-1).astype("int32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="schedule_worker")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--strategy", default="cpu")
    parser.add_argument("--per-replica-batch", type=int, default=16)
    parser.add_argument("--head-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--finetune-learning-rate", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0, help="data shuffle seed (in the config)")
    parser.add_argument(
        "--init-seed",
        type=int,
        default=0,
        help="model initialisation seed; a resumed run may pass another one",
    )
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--block-at", default=None, help="E:B, see the module docstring")
    parser.add_argument("--block-in-save", type=int, default=None)
    parser.add_argument("--block-before-history", type=int, default=None)
    parser.add_argument("--sigterm-at", default=None, help="E:B, see the module docstring")
    parser.add_argument(
        "--sigterm-signal", default="SIGTERM", help="what --sigterm-at sends (SIGINT: Ctrl-C)"
    )
    return parser.parse_args(argv)


# === For the tests that launch it ===


def command(run_dir: str | Path, out: str | Path, *args: str) -> list[str]:
    """The argv that runs this program (for `multiworker_helpers.run_processes`)."""
    return [sys.executable, str(THIS_FILE), "--run-dir", str(run_dir), "--out", str(out), *args]


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The checkpoint `latest.json` points at ("epoch-000003"), or None before the first."""
    try:
        with open(os.path.join(run_dir, "checkpoints", "latest.json"), encoding="utf-8") as f:
            return json.load(f)["checkpoint"]
    except FileNotFoundError:
        return None


def load_result(out: str | Path, worker: int = 0) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The final weights and the summary worker `worker` wrote to `out`."""
    with np.load(Path(out) / f"worker{worker}.npz") as arrays:
        weights = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    return weights, json.loads((Path(out) / f"worker{worker}.json").read_text())


def read_history_csv(run_dir: str | Path) -> list[dict[str, str]]:
    import csv

    with open(os.path.join(run_dir, "history.csv"), newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# === The program ===


def block(what: str) -> None:
    print(f"[worker] BLOCKED {what}", flush=True)
    threading.Event().wait()  # Until the test kills this process.


def audit_run_dir(run_dir: str, events: list[tuple[str, str]]) -> None:
    """Records every file or directory this process creates, writes, moves or deletes in
    `run_dir` (Python-level operations, which is how tfxfer writes its checkpoints), and
    prints each as `[audit] ...` at once, so a killed process's log still has them."""
    root = os.path.abspath(run_dir)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path: Any) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):  # e.g. a file descriptor
            return False
        path = os.path.abspath(os.fsdecode(path))
        return path == root or path.startswith(root + os.sep)

    def record(event: str, path: Any) -> None:
        events.append((event, os.fsdecode(path)))
        print(f"[audit] {event} {os.fsdecode(path)}", flush=True)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, _, flags = args
            if isinstance(flags, int) and flags & write_flags and inside(path):
                record(event, path)
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"):
            if args and inside(args[0]):
                record(event, args[0])

    sys.addaudithook(hook)


def install_save_blocks(args: argparse.Namespace) -> None:
    """Makes the trainer stop at an exact point of a checkpoint or history write."""
    from tfxfer.train import checkpoints, trainer

    real_json, real_text = checkpoints.atomic_write_json, trainer.atomic_write_text

    def atomic_write_json(path: str, obj: Any) -> None:
        real_json(path, obj)
        folder = os.path.basename(os.path.dirname(path))
        if path.endswith("state.json") and folder == f".tmp-epoch-{args.block_in_save:06d}":
            block(f"in the save of epoch {args.block_in_save}")

    def atomic_write_text(path: str, text: str) -> None:
        rows = text.count("\n") - 1  # history.csv: a header and one line per epoch.
        if path.endswith("history.csv") and rows == args.block_before_history:
            block(f"before history.csv gets epoch {args.block_before_history}")
        real_text(path, text)

    if args.block_in_save is not None:
        checkpoints.atomic_write_json = atomic_write_json
    if args.block_before_history is not None:
        trainer.atomic_write_text = atomic_write_text


def main(args: argparse.Namespace) -> None:
    audit: list[tuple[str, str]] = []
    audit_run_dir(args.run_dir, audit)

    import tfxfer
    from tfxfer.distribute import Distribution
    from tfxfer.recipe import finish_run, open_run

    # First thing: MultiWorkerMirroredStrategy must exist before TensorFlow runs an op.
    session = Distribution(args.strategy, "float32", args.per_replica_batch)
    distribution = session.describe()["distribution"]
    worker_index = max(int(distribution["worker_index"]), 0)
    print(f"[worker] {json.dumps(distribution)}", flush=True)

    import keras
    import tensorflow as tf

    from tfxfer.backbones import split_into_groups
    from tfxfer.data.pipeline import epoch_batches
    from tfxfer.heads import build_head

    install_save_blocks(args)
    keras.utils.set_random_seed(args.init_seed)
    with session.scope():
        inputs = keras.Input((NUM_FEATURES,), name="features")
        x = inputs
        for group, width in zip(GROUPS, (16, 16, 12), strict=True):
            x = keras.layers.Dense(width, activation="tanh", name=f"{group}_dense")(x)
        network = keras.Model(inputs, x, name="tiny_dense_network")
        backbone = tfxfer.Backbone(
            name="tiny_dense",
            network=network,
            preprocessor=None,
            output_kind="vector",
            input_kind="image",  # not used: the model below is built here, not by build_model
            layer_groups=split_into_groups(network.layers, [(g, f"{g}_") for g in GROUPS]),
        )
        head = tfxfer.HeadConfig(hidden_units=[8], dropout=0.0)
        model_inputs = keras.Input((NUM_FEATURES,), name="features")
        model = keras.Model(
            model_inputs,
            build_head(backbone.network(model_inputs), "vector", head, NUM_CLASSES, "single_label"),
            name="tiny_dense_model",
        )

    stages = [
        tfxfer.Stage("head", args.head_epochs, train="head", learning_rate=args.learning_rate),
        # Layer-wise rates need LayerwiseAdamW: its moments and step must survive a resume.
        tfxfer.Stage(
            "finetune",
            args.finetune_epochs,
            train="all",
            learning_rate=args.finetune_learning_rate,
            layerwise_lr_decay=0.5,
        ),
    ]
    config = {
        key: value
        for key, value in vars(args).items()
        if key not in ("run_dir", "out", "init_seed") and not key.startswith(("block", "sigterm"))
    }
    config["output_dir"] = args.run_dir
    run_dir = open_run(
        args.run_dir,
        config,
        overwrite=args.overwrite,
        resume=args.resume,
        extra=session.describe(),
        write=session.is_chief,
    )

    # Each worker keeps its share of every global batch (the pipeline shards by DATA).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    x_train, y_train = example_data(96, seed=0)
    x_val, y_val = example_data(32, seed=1)
    train = epoch_batches(
        tf.data.Dataset.from_tensor_slices((x_train, y_train)),
        num_examples=len(x_train),
        batch_size=session.global_batch_size,
        seed=args.seed,
    )
    val = (
        tf.data.Dataset.from_tensor_slices((x_val, y_val))
        .batch(session.global_batch_size)
        .with_options(options)
    )

    class AtBatch(keras.callbacks.Callback):
        def __init__(self, at: str, action):
            super().__init__()
            self.target, self.action, self.epoch = tuple(map(int, at.split(":"))), action, 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch + 1

        def on_train_batch_end(self, batch, logs=None):
            if (self.epoch, batch + 1) == self.target:
                self.action(f"at epoch {self.epoch} batch {batch + 1}")

    def sigterm(where: str) -> None:
        print(f"[worker] {args.sigterm_signal} {where}", flush=True)
        os.kill(os.getpid(), getattr(signal, args.sigterm_signal))

    callbacks = []
    if args.block_at:
        callbacks.append(AtBatch(args.block_at, block))
    if args.sigterm_at:
        callbacks.append(AtBatch(args.sigterm_at, sigterm))

    result = tfxfer.run_schedule(
        model,
        backbone,
        stages,
        train,
        val,
        run_dir=run_dir,
        strategy=session.strategy,
        config=config,
        callbacks=callbacks,
        verbose=0,
    )
    scores = finish_run(
        run_dir,
        model,
        result,
        CLASS_NAMES,
        {"val": val},
        export_saved_model=False,
        write=session.is_chief,
    )

    args.out.mkdir(parents=True, exist_ok=True)
    name = f"worker{worker_index}"
    np.savez(args.out / f"{name}.npz", *model.get_weights())
    summary = {
        "distribution": distribution,
        "resumed_from_epoch": result.resumed_from_epoch,
        "resumed_from_step": result.resumed_from_step,
        "history": result.history,
        "metrics": scores,
        "audit": audit,
    }
    (args.out / f"{name}.json").write_text(json.dumps(summary, default=float))
    print("[worker] TFXFER_DONE", flush=True)


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except Exception as error:
        from tfxfer.errors import TfxferError

        if isinstance(error, TfxferError):
            print(f"tfxfer: error: {error}", file=sys.stderr, flush=True)
            os._exit(2)
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # Skip TensorFlow's teardown, slow after a failed multi-worker step.
    sys.stdout.flush()
