"""Tests for `tfxfer.distribute`: strategy names, TF_CONFIG checks, precision, batch sizes.

In-process tests use only what a process may create at any time (the default,
OneDevice and one-device Mirrored strategies). Strategies that fix TensorFlow's device or
collective setup (MirroredStrategy over 2 logical CPUs, MultiWorkerMirroredStrategy) run in
child processes through `multiworker_helpers`, where they train a tiny model in two stages.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import keras
import multiworker_helpers as mh
import numpy as np
import pytest
import tensorflow as tf

from tfxfer import distribute, keras_compat
from tfxfer.errors import TfxferError

TWO_WORKERS = mh.tf_config([12345, 12346], 0)


def _no_tpu() -> None:
    raise ValueError("Please provide a TPU Name to connect to.")


def _local_tpu_resolver() -> tf.distribute.cluster_resolver.TPUClusterResolver:
    # A real resolver for a TPU "attached to this host": it resolves, as on a Cloud TPU VM,
    # but this machine has no TPU, so initialising it fails (quickly, without side effects).
    return tf.distribute.cluster_resolver.TPUClusterResolver(tpu="local")


@pytest.fixture(autouse=True)
def _no_tf_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)


# === Strategy names ===


def test_auto_without_accelerators_is_the_default_strategy() -> None:
    assert distribute.resolve_strategy_name("auto", tpu_resolver_factory=_no_tpu) == "default"
    strategy = distribute.get_strategy("auto", tpu_resolver_factory=_no_tpu)
    assert strategy is tf.distribute.get_strategy()
    assert distribute.describe(strategy) == {
        "strategy": "DefaultStrategy",
        "num_replicas": 1,
        "device_types": ["CPU"],
        "worker_index": 0,
        "worker_count": 1,
        "is_chief": True,
    }


def test_auto_with_the_default_tpu_lookup_finds_no_tpu_here() -> None:
    assert distribute.resolve_strategy_name("auto") == "default"


@pytest.mark.parametrize(
    ("name", "cls", "described_as"),
    [
        ("cpu", tf.distribute.OneDeviceStrategy, "OneDeviceStrategy"),
        ("one_device", tf.distribute.OneDeviceStrategy, "OneDeviceStrategy"),  # No GPU here.
        ("ONE-DEVICE", tf.distribute.OneDeviceStrategy, "OneDeviceStrategy"),
        ("mirrored", tf.distribute.MirroredStrategy, "MirroredStrategy"),  # All (1) CPUs.
    ],
)
def test_named_strategies(name: str, cls: type, described_as: str) -> None:
    strategy = distribute.get_strategy(name)
    assert isinstance(strategy, cls)
    assert strategy.num_replicas_in_sync == 1
    info = distribute.describe(strategy)
    assert info["strategy"] == described_as
    assert info["device_types"] == ["CPU"]
    with strategy.scope():
        variable = tf.Variable(1.0)
    assert "CPU" in variable.device


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(TfxferError) as error:
        distribute.get_strategy("gpu")
    message = str(error.value)
    assert "strategy='gpu'" in message
    for name in distribute.STRATEGY_NAMES:
        assert repr(name) in message
    with pytest.raises(TfxferError, match="string"):
        distribute.get_strategy(None)  # type: ignore[arg-type]


def test_tpu_is_detected_through_the_resolver() -> None:
    for name in ("auto", "tpu"):
        assert (
            distribute.resolve_strategy_name(name, tpu_resolver_factory=_local_tpu_resolver)
            == "tpu"
        )
    # It resolves, so "auto" commits to it and says why it cannot use it, instead of
    # silently training on the CPU of a TPU runtime.
    with pytest.raises(TfxferError, match="TPU cluster resolved .* could not be initialised"):
        distribute.get_strategy("auto", tpu_resolver_factory=_local_tpu_resolver)


def test_tpu_without_a_tpu_says_so() -> None:
    with pytest.raises(TfxferError, match="no TPU resolves.*Please provide a TPU Name"):
        distribute.get_strategy("tpu", tpu_resolver_factory=_no_tpu)


def test_multi_worker_without_tf_config() -> None:
    with pytest.raises(TfxferError, match="needs TF_CONFIG.*not set"):
        distribute.get_strategy("multi_worker")


def test_auto_picks_multi_worker_when_tf_config_names_two_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Resolution only: creating the strategy would fix this process's collective setup.
    monkeypatch.setenv("TF_CONFIG", TWO_WORKERS)
    assert distribute.resolve_strategy_name("auto", tpu_resolver_factory=_no_tpu) == "multi_worker"
    assert distribute.resolve_strategy_name("multi_worker") == "multi_worker"
    monkeypatch.setenv("TF_CONFIG", mh.tf_config([12345], 0))
    assert distribute.resolve_strategy_name("auto", tpu_resolver_factory=_no_tpu) == "default"


@pytest.mark.large
def test_multi_worker_created_too_late_says_when_to_create_it(tmp_path: Path) -> None:
    # In a child: the strategy fixes a process's collective setup for good.
    script = tmp_path / "late.py"
    script.write_text(
        "import tensorflow as tf\n"
        "from tfxfer import distribute\n"
        "from tfxfer.errors import TfxferError\n"
        "tf.reduce_sum(tf.ones(3))  # TensorFlow runs an op first.\n"
        "try:\n"
        "    distribute.get_strategy('multi_worker')\n"
        "except TfxferError as e:\n"
        "    print('TfxferError:', e)\n"
    )
    env = {"TF_CONFIG": mh.tf_config(mh.free_ports(1), 0)}
    result = mh.run_single(script, log_dir=tmp_path / "logs", timeout=60, env=env)
    assert result.ok, mh.describe_results([result])
    assert "TfxferError: MultiWorkerMirroredStrategy must be created before" in result.output
    assert "get_strategy() first thing" in result.output


@pytest.mark.parametrize(
    ("tf_config", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"task": {"type": "worker", "index": 0}}', "no 'cluster'"),
        (
            '{"cluster": {"worker": "127.0.0.1:1"}, "task": {"type": "worker", "index": 0}}',
            "must list 'host:port'",
        ),
        ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}}', "no 'task'"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker"}}', "no 'task'"),
        (
            '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "chief", "index": 0}}',
            "task type 'chief' is not a job",
        ),
        (
            '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": "0"}}',
            "must be an integer",
        ),
        (
            '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
            '"task": {"type": "worker", "index": 2}}',
            r"index 2 is out of range: job 'worker' lists 2 address\(es\), "
            r"so the index must be in 0..1",
        ),
        (
            '{"cluster": {"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"]}, '
            '"task": {"type": "worker", "index": 0}}',
            "parameter-server",
        ),
    ],
)
def test_malformed_tf_config(
    monkeypatch: pytest.MonkeyPatch, tf_config: str, expected: str
) -> None:
    monkeypatch.setenv("TF_CONFIG", tf_config)
    for name in ("multi_worker", "auto"):  # "auto" does not ignore a broken TF_CONFIG.
        with pytest.raises(TfxferError, match=expected):
            distribute.get_strategy(name, tpu_resolver_factory=_no_tpu)


def test_cluster_from_tf_config() -> None:
    assert distribute.cluster_from_tf_config({}) is None
    cluster = {"chief": ["h:1"], "worker": ["h:2", "h:3"]}
    info = distribute.cluster_from_tf_config(
        {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})}
    )
    assert info == distribute.ClusterInfo(
        worker_count=3, task_type="worker", task_index=1, worker_index=2, is_chief=False
    )
    info = distribute.cluster_from_tf_config(
        {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}})}
    )
    assert info is not None and info.is_chief and info.worker_index == 0
    # No "chief" job: worker 0 is the chief. An evaluator is not a training task.
    cluster = {"worker": ["h:1", "h:2"], "evaluator": ["h:3"]}
    for task_type, index, worker_index, is_chief in [
        ("worker", 0, 0, True),
        ("worker", 1, 1, False),
        ("evaluator", 0, -1, False),
    ]:
        task = {"type": task_type, "index": index}
        info = distribute.cluster_from_tf_config(
            {"TF_CONFIG": json.dumps({"cluster": cluster, "task": task})}
        )
        assert info is not None and info.worker_count == 2
        assert (info.worker_index, info.is_chief) == (worker_index, is_chief), task


def test_is_chief_on_one_host() -> None:
    # Multi-worker chiefs are checked in `test_multi_worker_trains_two_stages_like_one_process`.
    assert distribute.is_chief(None)
    assert distribute.is_chief(tf.distribute.get_strategy())
    for name in ("cpu", "mirrored"):
        assert distribute.is_chief(distribute.get_strategy(name))


# === Mixed precision ===


def test_mixed_precision_policy_names() -> None:
    # No GPU or TPU here: the CPU's own best, bfloat16 where it has AMX units.
    cpu = "mixed_bfloat16" if distribute.cpu_has_amx_bf16() else "float32"
    assert distribute.mixed_precision_policy("auto", distribute.get_strategy("cpu")) == cpu
    assert distribute.mixed_precision_policy("auto") == cpu
    for name in distribute.MIXED_PRECISION_POLICIES:
        assert distribute.mixed_precision_policy(name) == name
    with pytest.raises(TfxferError, match="one of .*Received: mixed_precision='float16'"):
        distribute.mixed_precision_policy("float16")
    with pytest.raises(TfxferError, match="Received: policy='auto'"):
        distribute.apply_mixed_precision("auto")


def test_auto_picks_bfloat16_only_on_a_cpu_with_amx_units(tmp_path, monkeypatch) -> None:
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert distribute.cpu_has_amx_bf16(str(amx)) is True
    assert distribute.cpu_has_amx_bf16(str(plain)) is False
    assert distribute.cpu_has_amx_bf16(str(tmp_path / "missing")) is False
    cpu = distribute.get_strategy("cpu")
    for found, policy in ((True, "mixed_bfloat16"), (False, "float32")):
        monkeypatch.setattr(distribute, "cpu_has_amx_bf16", lambda found=found: found)
        assert distribute.mixed_precision_policy("auto", cpu) == policy
        assert distribute.mixed_precision_policy("float32", cpu) == "float32"


def test_apply_mixed_precision_sets_and_restores_the_global_policy() -> None:
    before = keras.config.dtype_policy().name
    previous = distribute.apply_mixed_precision("mixed_bfloat16")
    try:
        assert previous == before
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        assert keras.layers.Dense(2).compute_dtype == "bfloat16"
    finally:
        distribute.apply_mixed_precision(previous)
    assert keras.config.dtype_policy().name == before


def _tiny_model() -> keras.Model:
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1, dtype="float32")]
    )


def test_keras_scales_the_loss_under_mixed_float16_at_every_compile() -> None:
    """What `apply_mixed_precision` promises about loss scaling, checked on keras itself.

    The autouse `_restore_dtype_policy` fixture puts the global policy back afterwards.
    """
    distribute.apply_mixed_precision("mixed_float16")
    model = _tiny_model()
    for stage in range(2):  # A schedule recompiles once per stage.
        model.layers[0].trainable = stage == 1
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        x = np.ones((8, 3), "float32")
        model.fit(x, np.ones((8, 1), "float32"), epochs=1, verbose=0)
        assert model.layers[0].compute_dtype == "float16"
        assert model.layers[0].kernel.dtype == "float32"
    wrapped = model.optimizer
    model.compile(optimizer=wrapped, loss="mse")
    assert model.optimizer is wrapped  # Not wrapped twice.
    distribute.apply_mixed_precision("mixed_bfloat16")
    model = _tiny_model()
    model.compile(optimizer="sgd", loss="mse")
    assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    # The policy counts when the model is built, not when it is compiled.
    distribute.apply_mixed_precision("float32")
    model = _tiny_model()
    distribute.apply_mixed_precision("mixed_float16")
    model.compile(optimizer="sgd", loss="mse")
    assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)


# === Batch size ===


def test_batch_sizes_on_one_replica() -> None:
    strategy = distribute.get_strategy("cpu")
    assert distribute.global_batch_size(32, strategy) == 32
    for bad in (0, -1, 2.0, True):
        with pytest.raises(TfxferError, match="positive integer"):
            distribute.global_batch_size(bad, strategy)  # type: ignore[arg-type]


# === Distribution ===


def test_distribution_on_cpu_applies_the_policy_and_leaves_keras_unpatched() -> None:
    was_patched = keras_compat.is_patched()
    keras_compat.unpatch_keras_for_multi_worker()  # Whatever an earlier test left.
    try:
        distribution = distribute.Distribution(
            "cpu", "mixed_bfloat16", per_replica_batch_size=8, scale_learning_rate=True
        )
        # The patch is for MultiWorkerMirroredStrategy only; one host runs stock Keras.
        assert not keras_compat.is_patched()
    finally:
        if was_patched:
            keras_compat.patch_keras_for_multi_worker()
    assert isinstance(distribution.strategy, tf.distribute.OneDeviceStrategy)
    # Set for the layers built next; the autouse `_restore_dtype_policy` fixture resets it.
    assert keras.config.dtype_policy().name == "mixed_bfloat16"
    assert distribution.is_chief
    assert distribution.describe() == {
        "distribution": {
            "strategy": "OneDeviceStrategy",
            "num_replicas": 1,
            "device_types": ["CPU"],
            "worker_index": 0,
            "worker_count": 1,
            "is_chief": True,
            "mixed_precision": "mixed_bfloat16",
            "per_replica_batch_size": 8,
            "global_batch_size": 8,
            "learning_rate_scale": 1.0,
        }
    }
    with distribution.scope():
        layer = keras.layers.Dense(2)
        layer.build((None, 3))
    assert layer.compute_dtype == "bfloat16" and "CPU" in layer.kernel.value.device


def test_distribution_checks_its_arguments_before_building_a_strategy() -> None:
    cpu = "mixed_bfloat16" if distribute.cpu_has_amx_bf16() else "float32"
    assert distribute.Distribution("cpu").policy == cpu  # "auto" on a CPU.
    with pytest.raises(TfxferError, match="Received: per_replica_batch_size=0"):
        distribute.Distribution("multi_worker", per_replica_batch_size=0)  # No TF_CONFIG here.
    with pytest.raises(TfxferError, match="Received: mixed_precision='float16'"):
        distribute.Distribution("cpu", "float16")


# === Real multi-replica strategies, in child processes ===


def _two_stage(out: Path, *args: str) -> list[str]:
    return [str(mh.THIS_FILE), "two_stage", "--out", str(out), *args]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, np.ndarray], dict]:
    """The two-stage run in one plain process with stock Keras (no patch), batch 16."""
    out = tmp_path_factory.mktemp("reference")
    script, *args = _two_stage(out, "--strategy", "cpu", "--patch", "none")
    result = mh.run_single(script, args, log_dir=out / "logs", timeout=120)
    assert result.ok, mh.describe_results([result])
    return mh.load_npz(out / "worker0.npz"), json.loads((out / "worker0.json").read_text())


def _assert_two_stages(weights: dict[str, np.ndarray]) -> None:
    """Stage 1 froze the first layer (kernel 0, bias 1); stage 2 trained it."""
    for i in (0, 1):
        np.testing.assert_array_equal(weights[f"stage1_{i}"], weights[f"init_{i}"])
        assert np.abs(weights[f"stage2_{i}"] - weights[f"stage1_{i}"]).max() > 1e-3
    for i in (2, 3):
        assert np.abs(weights[f"stage1_{i}"] - weights[f"init_{i}"]).max() > 1e-3
        assert np.abs(weights[f"stage2_{i}"] - weights[f"stage1_{i}"]).max() > 1e-3


def _assert_same_run(out: Path, worker: int, reference: tuple[dict[str, np.ndarray], dict]) -> None:
    """Same weights after each stage, predictions, per-epoch metrics and evaluation."""
    weights, summary = (
        mh.load_npz(out / f"worker{worker}.npz"),
        json.loads((out / f"worker{worker}.json").read_text()),
    )
    reference_weights, reference_summary = reference
    assert sorted(weights) == sorted(reference_weights)
    for key in reference_weights:
        # Only the order of float32 sums differs between replicas and one process.
        np.testing.assert_allclose(
            weights[key], reference_weights[key], rtol=1e-6, atol=1e-6, err_msg=key
        )
    # Metrics are averaged over replicas: the logs equal one process's, stage by stage.
    for stage in ("1", "2"):
        history, expected = summary["histories"][stage], reference_summary["histories"][stage]
        assert sorted(history) == sorted(expected)
        for name in expected:
            assert history[name] == pytest.approx(expected[name], rel=1e-5), (stage, name)
    assert len(summary["histories"]["2"]["val_loss"]) == 2  # initial_epoch=2, epochs=4.
    assert summary["evaluate"] == pytest.approx(reference_summary["evaluate"], rel=1e-5)


@pytest.mark.large
def test_mirrored_over_two_logical_cpus_trains_two_stages(
    tmp_path: Path, reference: tuple[dict[str, np.ndarray], dict]
) -> None:
    script, *args = _two_stage(tmp_path, "--strategy", "mirrored", "--logical-cpus", "2")
    result = mh.run_single(script, args, log_dir=tmp_path / "logs", timeout=120)
    assert result.ok, mh.describe_results([result])
    summary = json.loads((tmp_path / "worker0.json").read_text())
    assert summary["describe"]["strategy"] == "MirroredStrategy"
    assert summary["describe"]["num_replicas"] == 2
    assert summary["batch"]["global_of_8"] == 16
    _assert_two_stages(mh.load_npz(tmp_path / "worker0.npz"))
    _assert_same_run(tmp_path, 0, reference)


@pytest.mark.large
def test_mirrored_trains_a_split_its_replicas_cannot_share_evenly(tmp_path: Path) -> None:
    # 3 validation images over 2 replicas: Keras' stock build averaged the first batch over
    # the replicas and failed on the unequal shares; the recipe refused the run instead.
    script = str(mh.THIS_FILE)
    args = ["small_split", "--out", str(tmp_path), "--strategy", "mirrored"]
    result = mh.run_single(script, [*args, "--logical-cpus", "2"], log_dir=tmp_path / "logs")
    assert result.ok, mh.describe_results([result])
    assert "[worker] val examples 3" in result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["distribution"]["num_replicas"] == 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val"]["num_examples"] == 3


@pytest.mark.large
def test_multi_worker_trains_two_stages_like_one_process(
    tmp_path: Path, reference: tuple[dict[str, np.ndarray], dict]
) -> None:
    script, *args = _two_stage(tmp_path, "--strategy", "auto", "--patch", "all")
    results = mh.run_workers(script, args, num_workers=2, log_dir=tmp_path / "logs", timeout=150)
    assert all(r.ok for r in results), mh.describe_results(results)
    workers = [mh.load_npz(tmp_path / f"worker{i}.npz") for i in range(2)]
    for i, weights in enumerate(workers):
        summary = json.loads((tmp_path / f"worker{i}.json").read_text())
        assert summary["describe"] == {
            "strategy": "MultiWorkerMirroredStrategy",
            "num_replicas": 2,
            "device_types": ["CPU"],
            "worker_index": i,
            "worker_count": 2,
            "is_chief": i == 0,
        }
        assert summary["batch"]["global_of_8"] == 16
        _assert_two_stages(weights)
        _assert_same_run(tmp_path, i, reference)
    for key in workers[0]:
        np.testing.assert_array_equal(workers[0][key], workers[1][key], err_msg=key)


# === The process launcher itself (plain Python children: fast) ===

_WAITER = textwrap.dedent(
    """
    import json, os, sys, threading
    from pathlib import Path
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    print("worker", index, "started", flush=True)
    Path(sys.argv[1], f"ready{index}").touch()
    if sys.argv[2] == "hang" or index == 1:
        threading.Event().wait()  # Blocks until killed.
    sys.exit(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    """
)


@pytest.mark.large
def test_run_workers_kills_one_worker_when_a_condition_holds(tmp_path: Path) -> None:
    script = tmp_path / "waiter.py"
    script.write_text(_WAITER)
    results = mh.run_workers(
        script,
        [str(tmp_path), "finish"],
        log_dir=tmp_path / "logs",
        timeout=60,
        kill_when=lambda outputs: (tmp_path / "ready1").exists(),
        kill=[1],
    )
    assert [r.returncode for r in results] == [0, -9]
    assert [r.killed_by for r in results] == [None, "condition"]
    assert "worker 1 started" in results[1].output
    configs = [json.loads(line) for line in (mh.tf_config([1, 2], 0), mh.tf_config([1, 2], 1))]
    assert configs[1]["task"] == {"type": "worker", "index": 1}


@pytest.mark.large
def test_run_workers_never_outlives_its_timeout(tmp_path: Path) -> None:
    script = tmp_path / "waiter.py"
    script.write_text(_WAITER)
    results = mh.run_workers(script, [str(tmp_path), "hang"], log_dir=tmp_path / "logs", timeout=1)
    assert [r.killed_by for r in results] == ["timeout", "timeout"]
    assert all(r.returncode == -9 and not r.ok for r in results)


@pytest.mark.large
def test_a_failing_worker_takes_down_its_stuck_peer(tmp_path: Path) -> None:
    script = tmp_path / "waiter.py"
    script.write_text(_WAITER)
    results = mh.run_workers(
        script, [str(tmp_path), "finish", "3"], log_dir=tmp_path / "logs", timeout=60, grace=0.5
    )
    assert [r.returncode for r in results] == [3, -9]
    assert [r.killed_by for r in results] == [None, "peer_failed"]


def test_child_env_puts_the_repo_first_and_drops_tf_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_CONFIG", TWO_WORKERS)
    env = mh.child_env({"EXTRA": "1"})
    assert "TF_CONFIG" not in env and env["EXTRA"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(mh.REPO_ROOT)
    assert env["KERAS_BACKEND"] == "tensorflow"
    assert Path(sys.executable).exists()
