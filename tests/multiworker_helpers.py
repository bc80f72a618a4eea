"""Helpers to run TensorFlow worker processes from tests, and a worker program to run in them.

Multi-worker training can only be tested with real processes: each worker needs its own
`TF_CONFIG`, and TensorFlow fixes its devices and collective setup once per process. These
helpers launch N copies of any Python script on 127.0.0.1 with free ports, capture each one's
output to a log file, kill a worker when a condition holds (to test resuming after a lost
worker), and kill everything that is still running after a deadline, so a stuck collective
never hangs CI.

Run as a script, this module is also the worker program the tests launch:

    python tests/multiworker_helpers.py two_stage --out DIR [--strategy auto] [--patch all]

trains a tiny model in two stages (frozen first layer, then all layers with validation,
recompiling in between) and writes the weights after each stage, `evaluate` and `predict` results to
`DIR/worker<i>.npz` and `DIR/worker<i>.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve()

# Messages that mean the port picked by `free_ports` was taken before TensorFlow bound it.
_PORT_RACE_MESSAGES = ("Address already in use", "Failed to add port")


@dataclasses.dataclass
class WorkerResult:
    """How one launched process ended.

    Args:
        index: int. The worker's task index (0 for a single process).
        returncode: int or None. The exit code; negative for a signal (-9 when killed).
        output: str. Everything the process wrote to stdout and stderr.
        killed_by: str or None. None when it exited by itself; "condition" when
            `kill_when` fired, "peer_failed" when killed after another worker ended badly,
            "timeout" when it outlived the deadline.
        log_path: Path. The file its output was written to.
    """

    index: int
    returncode: int | None
    output: str
    killed_by: str | None
    log_path: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed_by is None


def free_ports(count: int) -> list[int]:
    """Returns `count` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: Sequence[int], index: int) -> str:
    """The `TF_CONFIG` JSON for worker `index` of a cluster of local workers on `ports`."""
    return json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
            "task": {"type": "worker", "index": index},
        }
    )


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: this one's, minus `TF_CONFIG`, plus the repo on
    `PYTHONPATH`, the TensorFlow backend, quiet TensorFlow logs and unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["KERAS_BACKEND"] = "tensorflow"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _kill(process: subprocess.Popen) -> None:
    """Kills a child and its process group (it was started in a session of its own)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()


def run_processes(
    commands: Sequence[Sequence[str]],
    envs: Sequence[Mapping[str, str]],
    *,
    log_dir: Path,
    timeout: float = 120.0,
    kill_when: Callable[[list[str]], bool] | None = None,
    kill: Sequence[int] | None = None,
    grace: float = 10.0,
    poll_interval: float = 0.05,
) -> list[WorkerResult]:
    """Runs processes side by side and returns how each one ended; never outlives `timeout`.

    Args:
        commands: list of argv lists, one per process.
        envs: list of environments, one per process.
        log_dir: Path. Where `process<i>.log` files (stdout and stderr) are written.
        timeout: float. Seconds after which every process still running is killed.
        kill_when: callable. Called with the outputs so far (one string per process) each
            `poll_interval`; the first time it returns True, the processes in `kill` are
            killed with SIGKILL, as a preempted machine would be.
        kill: list of int. Which processes `kill_when` kills. Defaults to all.
        grace: float. Once a process has failed or been killed, the others get this many
            seconds to finish (a surviving worker usually blocks in a collective op
            waiting for the dead one) before they are killed too.
        poll_interval: float. How long to wait on a process between checks.

    Returns:
        One `WorkerResult` per command, in order.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"process{i}.log" for i in range(len(commands))]
    processes: list[subprocess.Popen] = []
    killed_by: list[str | None] = [None] * len(commands)
    try:
        for command, env, log in zip(commands, envs, logs, strict=True):
            with open(log, "wb") as out:
                processes.append(
                    subprocess.Popen(
                        list(command),
                        env=dict(env),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        cwd=REPO_ROOT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout
        grace_deadline: float | None = None
        condition_fired = kill_when is None
        while True:
            running = [i for i, p in enumerate(processes) if p.poll() is None]
            if not running:
                break
            now = time.monotonic()
            if not condition_fired and kill_when([_read(log) for log in logs]):
                condition_fired = True
                for i in range(len(processes)) if kill is None else kill:
                    if processes[i].poll() is None:
                        _kill(processes[i])
                        killed_by[i] = "condition"
                continue
            failed = any(
                killed_by[i] or (p.returncode not in (None, 0)) for i, p in enumerate(processes)
            )
            if failed and grace_deadline is None:
                grace_deadline = now + grace
            for reason, limit in (("peer_failed", grace_deadline), ("timeout", deadline)):
                if limit is not None and now >= limit:
                    for i in running:
                        _kill(processes[i])
                        killed_by[i] = killed_by[i] or reason
            try:
                processes[running[0]].wait(timeout=poll_interval)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for i, process in enumerate(processes):  # Only on an exception in this function.
            if process.poll() is None:
                _kill(process)
                killed_by[i] = killed_by[i] or "timeout"
            process.wait()
    return [
        WorkerResult(i, p.returncode, _read(log), killed_by[i], log)
        for i, (p, log) in enumerate(zip(processes, logs, strict=True))
    ]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def run_workers(
    script: str | Path,
    args: Sequence[str] = (),
    *,
    num_workers: int = 2,
    log_dir: Path,
    timeout: float = 120.0,
    worker_args: Callable[[int], Sequence[str]] | None = None,
    env: Mapping[str, str] | None = None,
    kill_when: Callable[[list[str]], bool] | None = None,
    kill: Sequence[int] | None = None,
    grace: float = 10.0,
    port_retries: int = 2,
) -> list[WorkerResult]:
    """Runs `python script *args` as a cluster of `num_workers` workers on 127.0.0.1.

    Each worker gets a `TF_CONFIG` naming all of them (free ports, picked anew if TensorFlow
    finds one taken) and its own index. Everything else is as in `run_processes`.

    Args:
        script: str or Path. The Python script each worker runs.
        args: list of str. Arguments for every worker.
        num_workers: int. How many workers. Defaults to 2.
        log_dir: Path. Where each attempt's logs are written.
        timeout: float. Seconds before every worker still running is killed.
        worker_args: callable. Extra arguments for worker `i`, e.g. its own output dir.
        env: mapping. Extra environment variables for every worker.
        kill_when, kill, grace: see `run_processes`.
        port_retries: int. How many times to retry with new ports after a port race.

    Returns:
        One `WorkerResult` per worker, by task index.
    """
    for attempt in range(port_retries + 1):
        ports = free_ports(num_workers)
        commands = [
            [sys.executable, str(script), *args, *(worker_args(i) if worker_args else ())]
            for i in range(num_workers)
        ]
        envs = [
            child_env({**(env or {}), "TF_CONFIG": tf_config(ports, i)}) for i in range(num_workers)
        ]
        results = run_processes(
            commands,
            envs,
            log_dir=log_dir / f"attempt{attempt}",
            timeout=timeout,
            kill_when=kill_when,
            kill=kill,
            grace=grace,
        )
        port_race = any(m in r.output for r in results for m in _PORT_RACE_MESSAGES)
        if not port_race:
            break
    return results


def run_single(
    script: str | Path,
    args: Sequence[str] = (),
    *,
    log_dir: Path,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> WorkerResult:
    """Runs `python script *args` once, without `TF_CONFIG`, killed after `timeout`."""
    command = [sys.executable, str(script), *args]
    return run_processes([command], [child_env(env)], log_dir=log_dir, timeout=timeout)[0]


def describe_results(results: Sequence[WorkerResult], tail: int = 3000) -> str:
    """The end of each process's output, for an assertion message."""
    return "\n".join(
        f"--- process {r.index}: returncode={r.returncode} killed_by={r.killed_by} "
        f"log={r.log_path}\n{r.output[-tail:]}"
        for r in results
    )


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Loads every array of an `.npz` file into a plain dict."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


# === Worker program ===

NUM_EXAMPLES = 64
NUM_FEATURES = 4


def example_data() -> tuple[np.ndarray, np.ndarray]:
    """The fixed data every worker and every reference run trains on."""
    rng = np.random.RandomState(0)
    x = rng.randn(NUM_EXAMPLES, NUM_FEATURES).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5, 1.5]) > 0).astype("float32")[:, None]
    return x, y


def _split_cpu(logical_cpus: int) -> None:
    """Splits the CPU into logical devices, before anything initialises TensorFlow's devices
    (getting a strategy does)."""
    import tensorflow as tf

    if logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus
        )


def _two_stage(argv: Sequence[str]) -> None:
    """Trains a tiny model in two stages and writes what it learned; see the module doc."""
    parser = argparse.ArgumentParser(prog="two_stage")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--patch", default="all", help="all, none, or one name of PATCHES")
    parser.add_argument("--logical-cpus", type=int, default=0)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--stage1-epochs", type=int, default=2)
    parser.add_argument("--stage2-epochs", type=int, default=2)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import tensorflow as tf

    _split_cpu(args.logical_cpus)

    import keras

    from tfxfer import distribute, keras_compat

    strategy = distribute.get_strategy(args.strategy)
    if args.patch != "none":
        only = None if args.patch == "all" else (args.patch,)
        keras_compat.patch_keras_for_multi_worker(only=only)
    info = distribute.describe(strategy)
    print(f"[worker] {json.dumps(info)} patched={keras_compat.is_patched()}", flush=True)

    x, y = example_data()
    options = tf.data.Options()
    # DATA sharding: every worker reads all the data and keeps its slice of each global
    # batch, so a step sees the same 16 examples as a single process with batch 16.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(args.global_batch, drop_remainder=True)
        .with_options(options)
    )
    inputs_only = (
        tf.data.Dataset.from_tensor_slices(x).batch(args.global_batch).with_options(options)
    )

    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((NUM_FEATURES,)),
                keras.layers.Dense(8, activation="tanh", name="frozen"),
                keras.layers.Dense(1, activation="sigmoid", name="head"),
            ]
        )
    rng = np.random.RandomState(1)  # Same start everywhere, whatever the strategy.
    model.set_weights([rng.randn(*w.shape).astype("float32") * 0.5 for w in model.weights])
    out: dict[str, Any] = {"init": model.get_weights()}

    class EpochMarker(keras.callbacks.Callback):
        """Touches `<out>/w<i>_stage<s>_epoch<e>.done`: something for `kill_when` to watch."""

        def __init__(self, stage: int) -> None:
            super().__init__()
            self.stage = stage

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            marker = args.out / f"w{info['worker_index']}_stage{self.stage}_epoch{epoch}.done"
            marker.touch()
            print(f"[worker] stage {self.stage} epoch {epoch} done {logs}", flush=True)

    histories = {}
    stages = [
        (1, False, 0.5, 0, args.stage1_epochs),
        (2, True, 0.2, args.stage1_epochs, args.stage1_epochs + args.stage2_epochs),
    ]
    for stage, frozen_trainable, lr, initial_epoch, epochs in stages:
        # A stage always recompiles: `trainable` is read when the train function is made.
        model.get_layer("frozen").trainable = frozen_trainable
        with strategy.scope():
            model.compile(
                optimizer=keras.optimizers.SGD(lr),
                loss="binary_crossentropy",
                metrics=["accuracy"],
            )
        history = model.fit(
            train,
            epochs=epochs,
            initial_epoch=initial_epoch,
            verbose=0,
            validation_data=train if stage == 2 else None,
            callbacks=[EpochMarker(stage)],
        )
        histories[stage] = history.history
        out[f"stage{stage}"] = model.get_weights()

    evaluation = model.evaluate(train, verbose=0, return_dict=True)
    batch: dict[str, Any] = {"global_of_8": distribute.global_batch_size(8, strategy)}
    out["predict"] = [model.predict(inputs_only, verbose=0)]

    arrays = {
        f"{key}_{i}": np.asarray(v) for key, values in out.items() for i, v in enumerate(values)
    }
    name = f"worker{info['worker_index']}"
    np.savez(args.out / f"{name}.npz", **arrays)
    summary = {"describe": info, "histories": histories, "evaluate": evaluation, "batch": batch}
    (args.out / f"{name}.json").write_text(json.dumps(summary, default=float))
    print("[worker] TFXFER_DONE", flush=True)


def _regularized(argv: Sequence[str]) -> None:
    """Fine-tunes a tiny dense backbone with each regularizer through `run_schedule`.

    Writes `<out>/<regularizer>.npz` (final weights) per regularizer, for comparing a
    strategy's result with one process's.
    """
    parser = argparse.ArgumentParser(prog="regularized")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--strategy", default="cpu")
    parser.add_argument("--logical-cpus", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import tensorflow as tf

    _split_cpu(args.logical_cpus)

    import keras

    import tfxfer
    from tfxfer import distribute
    from tfxfer.backbones import split_into_groups
    from tfxfer.backbones.base import SourceHead
    from tfxfer.data.pipeline import epoch_batches
    from tfxfer.heads import build_head

    strategy = distribute.get_strategy(args.strategy)
    x, y = example_data()
    labels = y[:, 0].astype("int32")
    for kind in ("l2sp", "features", "source_task"):
        rng = np.random.RandomState(1)
        with strategy.scope():
            inputs = keras.Input((NUM_FEATURES,))
            hidden = keras.layers.Dense(8, activation="tanh", name="low_dense")(inputs)
            top = keras.layers.Dense(6, activation="tanh", name="top_dense")(hidden)
            network = keras.Model(inputs, top, name="dense_network")
            source = keras.layers.Dense(4, activation="softmax", name="source")
            source.build((None, 6))
            backbone = tfxfer.Backbone(
                name="dense",
                network=network,
                preprocessor=None,
                output_kind="vector",
                input_kind="image",
                layer_groups=split_into_groups(network.layers, [("low", "low_"), ("top", "top_")]),
            )
            backbone.source_heads = {"toy": SourceHead(source, None, 4)}
            head = tfxfer.HeadConfig(dropout=0.0)
            model_inputs = keras.Input((NUM_FEATURES,))
            model = keras.Model(
                model_inputs,
                build_head(backbone.network(model_inputs), "vector", head, 2, "single_label"),
            )
        backbone.head_pooling = None
        for variable in [*model.weights, *source.weights]:
            variable.assign(rng.randn(*variable.shape).astype("float32") * 0.5)
        train = epoch_batches(
            tf.data.Dataset.from_tensor_slices((x, labels)),
            num_examples=len(x),
            batch_size=16,
            seed=0,
        )
        tfxfer.run_schedule(
            model,
            backbone,
            [
                tfxfer.Stage("head", 1, learning_rate=1e-2),
                tfxfer.Stage(
                    "finetune",
                    2,
                    train="all",
                    learning_rate=1e-2,
                    regularizer=kind,
                    regularizer_weight=5.0,
                ),
            ],
            train,
            strategy=strategy,
            verbose=0,
        )
        np.savez(args.out / f"{kind}.npz", *[np.asarray(w) for w in model.get_weights()])
    print("[worker] TFXFER_DONE", flush=True)


def _pretraining(argv: Sequence[str]) -> None:
    """Runs a pretraining recipe on tiny data it writes, under a strategy and a precision.

    `masked_lm`: a tiny random BERT on two sentences; `contrastive`: SimCLR on drawn shapes.
    Writes the run into `<out>/run` (its preset or weights file included).
    """
    parser = argparse.ArgumentParser(prog="pretraining")
    parser.add_argument("recipe", choices=("masked_lm", "contrastive"))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--strategy", default="cpu")
    parser.add_argument("--mixed-precision", default="float32")
    parser.add_argument("--logical-cpus", type=int, default=0)
    parser.add_argument("--backbone", default=None, help="contrastive: tinynet, or a real row")
    args = parser.parse_args(argv)
    _split_cpu(args.logical_cpus)
    run = {
        "output_dir": str(args.out / "run"),
        "strategy": args.strategy,
        "mixed_precision": args.mixed_precision,
        "epochs": 2,
    }
    if args.recipe == "masked_lm":
        from bert_helpers import write_hf_checkpoint

        from recipes.bert_mlm_pretrain import Config, main

        write_hf_checkpoint(args.out / "bert")
        corpus = args.out / "corpus.txt"
        corpus.write_text("the movie was great fun\ni hated the awful plot\n" * 12, "utf-8")
        fields = {"corpus": str(corpus), "backbone": str(args.out / "bert"), "learning_rate": 1e-3}
    else:
        from recipes.contrastive_image_pretrain import Config, main
        from tfxfer.data.synthetic import write_shapes_dataset

        write_shapes_dataset(str(args.out / "data"), per_class=4, image_size=32)
        fields = {"data_dir": str(args.out / "data")}
        if args.backbone is not None:
            import pytest
            from helpers import register_tiny_backbones

            register_tiny_backbones(pytest.MonkeyPatch())
            fields["backbone"] = args.backbone
    main(Config.smoke(**run, **fields))
    print("[worker] TFXFER_DONE", flush=True)


def run_pretraining_under_mirrored(recipe: str, out: Path, *extra: str) -> dict:
    """Runs `_pretraining` under MirroredStrategy over 2 logical CPUs in bfloat16.

    Checks that it finished, trained two epochs and recorded its strategy and precision;
    returns the run's `config.json`. `extra`: more of `_pretraining`'s flags (`--backbone`).
    """
    args = ["pretraining", recipe, "--out", str(out), "--strategy", "mirrored"]
    args += ["--logical-cpus", "2", "--mixed-precision", "mixed_bfloat16", *extra]
    result = run_single(str(THIS_FILE), args, log_dir=out / "logs", timeout=240)
    assert result.ok, describe_results([result])
    config = json.loads((out / "run" / "config.json").read_text())
    assert config["distribution"]["num_replicas"] == 2
    assert config["distribution"]["mixed_precision"] == "mixed_bfloat16"
    assert len((out / "run" / "history.csv").read_text().splitlines()) == 3  # header, 2 epochs
    return config


def _small_split(argv: Sequence[str]) -> None:
    """The image recipe under a strategy on 9 images: 6 to train, a validation split of 3,
    which 2 replicas cannot share evenly. Writes the run into `<out>/run`."""
    parser = argparse.ArgumentParser(prog="small_split")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--strategy", default="cpu")
    parser.add_argument("--logical-cpus", type=int, default=0)
    args = parser.parse_args(argv)
    _split_cpu(args.logical_cpus)
    import pytest
    from helpers import register_tiny_backbones

    from recipes.resnet50_image_classifier import Config, main
    from tfxfer.data.synthetic import write_shapes_dataset

    # A tiny CNN (with BatchNorm) is enough: what is tested is Keras' build under the
    # strategy on a batch the replicas cannot share, not the network.
    register_tiny_backbones(pytest.MonkeyPatch())
    data = write_shapes_dataset(str(args.out / "data"), per_class=3, image_size=32, seed=0)
    result = main(
        Config.smoke(
            data_dir=data,
            output_dir=str(args.out / "run"),
            strategy=args.strategy,
            backbone="tinynet",
            weights="none",
            image_size=32,
            val_split=0.34,
        )
    )
    print(f"[worker] val examples {result['metrics']['val']['num_examples']}", flush=True)
    print("[worker] TFXFER_DONE", flush=True)


def _image_recipe(argv: Sequence[str]) -> None:
    """`python -m recipes.resnet50_image_classifier ARGS` with the tiny rows registered
    (`--backbone tinynet`), for the command-line tests whose point is not the network.

    `--block-after-checkpoint E` (before the recipe's own arguments) stops the run once the
    checkpoint of global epoch E is complete and waits to be killed, as `schedule_worker.py`'s
    `--block-*` options do: a kill at an exact epoch, however fast the epochs are.
    """
    import runpy

    parser = argparse.ArgumentParser(prog="image_recipe", allow_abbrev=False)
    parser.add_argument("--block-after-checkpoint", type=int, default=None)
    args, recipe_argv = parser.parse_known_args(argv)
    import pytest
    from helpers import register_tiny_backbones

    register_tiny_backbones(pytest.MonkeyPatch())
    if args.block_after_checkpoint is not None:
        import threading

        from tfxfer.train.checkpoints import Checkpointer

        save = Checkpointer.save

        def save_then_block(self, model, state, *rest, **kwargs):
            save(self, model, state, *rest, **kwargs)
            if state["global_epoch"] == args.block_after_checkpoint and not state.get("step"):
                print(f"[worker] BLOCKED after checkpoint {state['global_epoch']}", flush=True)
                threading.Event().wait()  # Until the test kills this process.

        Checkpointer.save = save_then_block
    module = "recipes.resnet50_image_classifier"
    sys.argv = [module, *recipe_argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


PROGRAMS: dict[str, Callable[[Sequence[str]], None]] = {
    "image_recipe": _image_recipe,
    "small_split": _small_split,
    "pretraining": _pretraining,
    "two_stage": _two_stage,
    "regularized": _regularized,
}


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in PROGRAMS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(PROGRAMS)}}} [args...]")
    try:
        PROGRAMS[sys.argv[1]](sys.argv[2:])
    except Exception:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip TensorFlow's teardown, which takes seconds after a failed multi-worker step.
        os._exit(1)
