"""End-to-end runs of `python -m experiments.train` on a tiny arithmetic config: the CLI, the
metrics it writes, and resume after SIGKILL giving the same metrics as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import TINY_ARITH, as_flags

from dynamo_jax.allocation import allocation_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *as_flags(TINY_ARITH),
    "--config.model.architecture.num_hidden_layers=2",
    "--config.data.num_train=64",
    "--config.data.num_heldout=16",
    "--config.eval.num_prompts=16",
    "--config.sft.steps=10",
    "--config.sft.num_examples=200",
    "--config.train.num_steps=6",
    "--config.train.num_minibatches=2",
    "--config.train.micro_batch_rows=8",
    "--config.checkpoint_every=2",
    "--config.eval.every=3",
    "--config.optim.learning_rate=1e-3",
    "--config.sampling.max_rows_per_call=16",  # 32 rollouts per step, sampled in >= 2 calls
    # not the defaults: prompt_stats.csv must show the weights the run allocates with
    "--config.allocation.weight_exponent=0.5",
    "--config.allocation.min_weight=0.01",
]
VOLATILE = ("time_", "tokens_per_s", "compilations")


def command(workdir, *extra):
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "--config",
        "configs/arith_tiny.py",
        "--workdir",
        str(workdir),
        "--noprogress",
        *TINY,
        *extra,
    ]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)  # one device, as a user would run it
    e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return e


def read_metrics(workdir):
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
    workdir = tmp_path_factory.mktemp("run_a")
    proc = subprocess.run(
        command(workdir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_run_writes_metrics_checkpoints_and_summary(uninterrupted):
    workdir, proc = uninterrupted
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(6))
    for key in (
        "reward",
        "accuracy",
        "zero_variance_frac",
        "alloc_min",
        "alloc_max",
        "entropy",
        "clip_frac_low",
        "clip_frac_high",
        "approx_kl",
        "grad_norm",
        "beta_comp_pos_mean",
        "beta_stab_mean",
        "response_length_mean",
        "truncation_rate",
    ):
        assert key in rows[0], key
    assert "eval_accuracy" in rows[2] and "eval_accuracy" in rows[5]
    assert all(r["alloc_mean"] == 4.0 for r in rows)  # sum n_i = B every step
    summary = json.loads((workdir / "summary.json").read_text())
    assert {"heldout_accuracy_before", "heldout_accuracy_after"} <= set(summary)
    assert "held-out accuracy:" in proc.stdout
    assert sorted(os.listdir(workdir / "checkpoints"))[-1] == "6"
    table = np.genfromtxt(workdir / "prompt_stats.csv", delimiter=",", names=True)
    assert len(table) == 48 and table["G"].sum() == 6 * 32  # 6 steps x 8 new prompts x 4 rollouts
    expected = allocation_weights(table["k"], table["G"], weight_exponent=0.5, min_weight=0.01)
    assert np.all(expected >= 0.1)
    np.testing.assert_allclose(table["weight"], expected, rtol=1e-12)
    assert any(f.startswith("events") for f in os.listdir(workdir / "tensorboard"))


def test_resume_after_sigkill_reproduces_metrics(uninterrupted, tmp_path, env):
    workdir_a, _ = uninterrupted
    workdir = tmp_path / "run_b"
    proc = subprocess.Popen(
        command(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(metrics.read_text().splitlines())
    assert killed_at < 6
    again = subprocess.run(
        command(workdir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    assert read_metrics(workdir) == read_metrics(workdir_a)
    # the held-out result before RL comes back from the checkpoint (summary.json is written at
    # the end, so the killed run never wrote it)
    summary_a = json.loads((workdir_a / "summary.json").read_text())
    summary_b = json.loads((workdir / "summary.json").read_text())
    for key in ("heldout_accuracy_before", "heldout_accuracy_after"):
        assert summary_b[key] == summary_a[key], key
    assert "before RL ->" in again.stdout
    # a finished run started again does nothing (no new evaluation) and says so
    done = subprocess.run(
        command(workdir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "nothing to do" in done.stdout, done.stderr[-3000:]
    assert "before RL ->" in done.stdout
    assert json.loads((workdir / "summary.json").read_text()) == summary_b


def test_help_and_config_errors(env):
    def run(cmd):
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    help_out = run([sys.executable, "-m", "experiments.train", "--help"])
    assert "--workdir" in help_out.stdout and "resumes" in help_out.stdout
    bad = run(command("/nonexistent/never", "--config.allocation.n_low=9"))
    assert bad.returncode != 0
    assert "allocation.n_low = 9" in bad.stderr and "[72, 64]" in bad.stderr
    assert not Path("/nonexistent/never").exists()
    typo = run(command("/nonexistent/never", "--config.trian.num_steps=1"))
    assert typo.returncode != 0 and "Traceback" not in typo.stderr
    assert "--config.trian.num_steps: no such config field" in typo.stderr
    assert "Did you mean --config.train.num_steps" in typo.stderr


@pytest.mark.parametrize(
    "flag,changed",
    [
        ("--config.model.architecture.hidden_size=48", "model.architecture.hidden_size: 32 -> 48"),
        ("--config.data.num_train=40", "data.num_train: 64 -> 40"),
    ],
)
def test_resume_that_cannot_fit_names_the_changed_settings(
    uninterrupted, tmp_path, env, flag, changed
):
    """The checkpoint's train state has other shapes than the config's model, or its data order
    covers other prompts: one message listing the settings that differ from the checkpoint's,
    not Orbax's internals or a bare iterator error."""
    import shutil

    workdir_a, _ = uninterrupted
    workdir = tmp_path / "run_c"
    shutil.copytree(workdir_a, workdir)
    shutil.rmtree(workdir / "sft_model")  # else the cached warm start's own check stops it first
    proc = subprocess.run(
        command(workdir, flag),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Cannot resume" in proc.stderr and changed in proc.stderr
    assert "another --workdir" in proc.stderr


def test_task_checks_before_training():
    """Too few prompts for one step, or a prompt longer than every bucket: the run stops before
    the warm start, naming the prompt and the fields (it used to fail steps later)."""
    from types import SimpleNamespace

    from dynamo_jax.config import get_default_config
    from dynamo_jax.trainer import RunError, check_task_fits

    c = get_default_config()
    c.data.task, c.prompts_per_step, c.buckets.prompt_len = "arithmetic", 2, (4, 8)
    records = [{"id": f"p{i}", "prompt": "x" * (3 + 2 * i)} for i in range(3)]
    task = SimpleNamespace(train=records[:2], heldout=records, encode_prompt=list)
    notes = []
    long_one = SimpleNamespace(**{**vars(task), "heldout": [{"id": "h9", "prompt": "x" * 9}]})
    with pytest.raises(RunError, match=r"held-out prompt 'h9' is 9 tokens long.*\[4, 8\]"):
        check_task_fits(c, long_one, notes.append)
    check_task_fits(c, task, notes.append)
    assert notes == ["note: eval.num_prompts = 200, the held-out set has 3"]
    c.prompts_per_step = 3
    with pytest.raises(
        RunError,
        match=r"prompts_per_step = 3 but the training data "
        r"\(data.num_train\) holds 2 prompts",
    ):
        check_task_fits(c, task, notes.append)


def _out_of_memory():
    """A real device out-of-memory error: XLA's RESOURCE_EXHAUSTED for 256 TiB, more than a
    47-bit address space holds, so the allocation fails at once even where the OS overcommits."""
    import jax
    import jax.numpy as jnp

    jax.jit(lambda: jnp.ones((2**46,), jnp.float32))().block_until_ready()


def test_out_of_memory_is_explained_with_the_fields_to_change():
    """A device OOM inside the guard becomes a MemoryError naming the config fields (with this
    run's values) that bound a step's memory; XLA's error stays its cause; other errors pass."""
    import jax

    from dynamo_jax.config import get_default_config
    from dynamo_jax.trainer import explain_out_of_memory

    c = get_default_config()
    c.train.micro_batch_rows, c.sampling.max_rows_per_call = 48, 0
    with pytest.raises(MemoryError) as info:
        with explain_out_of_memory(c, "RL step 3"):
            _out_of_memory()
    msg = str(info.value)
    assert msg.startswith("RL step 3 ran out of device memory")
    for text in (
        "model.remat=True (now False)",
        "train.micro_batch_rows=48 rows x up to 5120 positions",  # 2048 prompt + 3072 new
        "sampling.max_rows_per_call=0 (8192 of the step's 8192 rollouts)",
        "loss.logits_chunk_size=128",
        "model.dtype=float32",
        "mesh.fsdp=",
    ):
        assert text in msg, text
    assert isinstance(info.value.__cause__, jax.errors.JaxRuntimeError)
    assert "RESOURCE_EXHAUSTED" in str(info.value.__cause__)
    with pytest.raises(ValueError, match="^unrelated$"):
        with explain_out_of_memory(c, "RL step 3"):
            raise ValueError("unrelated")


def _in_process_config(**changes):
    """configs/arith_tiny.py cut down for a run inside the test process (one layer, no warm
    start, 64 prompts), then `changes` (dotted keys, as in TINY_ARITH)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("arith_tiny", ROOT / "configs" / "arith_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    small = {
        "model.architecture.num_hidden_layers": 1,
        "sft.steps": 0,
        "eval.num_prompts": 4,
        "data.num_train": 64,
        "data.num_heldout": 16,
    }
    for key, value in {**small, **changes}.items():
        *path, leaf = key.split(".")
        node = c
        for part in path:
            node = node[part]
        node[leaf] = value
    return c


def test_train_loop_explains_an_out_of_memory_step(monkeypatch, tmp_path):
    """trainer.train wraps each RL step and each held-out evaluation in the guard (each is
    replaced by a real OOM in turn). However the run fails, it closes what it opened: the
    checkpoint manager and the task (a math task's verifier processes); the evaluation before
    RL used to fail with both left open."""
    from dynamo_jax import checkpoint, trainer

    opened, closed = [], []

    class Tracked(checkpoint.RunCheckpointer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

        def close(self):
            closed.append(self)
            super().close()

    def tracked_task(*args, **kwargs):
        task = build_task(*args, **kwargs)
        task.close = lambda: closed.append(task)
        opened.append(task)
        return task

    build_task = trainer.build_task
    monkeypatch.setattr(trainer.ckpt_lib, "RunCheckpointer", Tracked)
    monkeypatch.setattr(trainer, "build_task", tracked_task)

    c = _in_process_config()
    monkeypatch.setattr(trainer, "_rl_step", lambda *a, **k: _out_of_memory())
    with pytest.raises(MemoryError, match="^RL step 0 ran out of device memory"):
        trainer.train(c, str(tmp_path), progress=False, log=lambda msg: None)
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: _out_of_memory())
    with pytest.raises(MemoryError, match="^The held-out evaluation at step 0 ran out of device"):
        trainer.train(c, str(tmp_path), progress=False, log=lambda msg: None)
    assert len(opened) == 4 and sorted(map(id, closed)) == sorted(map(id, opened))


def test_resume_lists_the_settings_that_changed(tmp_path):
    """Resuming a work dir with other settings goes on with the new ones and lists exactly the
    fields that changed, from the config saved in the checkpoint."""
    from dynamo_jax import trainer

    def config(**changes):
        one_update = {"train.num_minibatches": 1, "train.micro_batch_rows": 32}
        return _in_process_config(**TINY_ARITH, **one_update, checkpoint_every=1, **changes)

    def run(c):
        logged = []
        trainer.train(c, str(tmp_path), progress=False, log=logged.append)
        return "\n".join(logged)

    run(config(**{"train.num_steps": 1}))
    longer = run(config(**{"train.num_steps": 2}))
    assert "resumed from" in longer and "  train.num_steps: 1 -> 2" in longer
    assert "loss.eps_high" not in longer and longer.count(" -> ") == 1
    changed = run(config(**{"train.num_steps": 3, "loss.eps_high": 0.2}))
    assert "resuming with settings that differ from the checkpoint's" in changed
    assert "  loss.eps_high: 0.28 -> 0.2" in changed and "  train.num_steps: 2 -> 3" in changed
    assert trainer.config_changes(config().to_json(), config()) == []


def test_benchmark_evaluation_uses_the_sampling_row_bound(monkeypatch):
    """Held-out benchmark evaluation sends at most sampling.max_rows_per_call rows per sampler
    call, like RL sampling (it used a fixed 1024, so lowering the field after an out-of-memory
    error did not bound evaluation's KV cache); 0 keeps evaluation's own default."""
    import types

    import jax

    from dynamo_jax import evaluation, trainer
    from dynamo_jax.config import get_default_config

    seen = []

    def fake(*args, **kwargs):
        seen.append(kwargs["max_rows_per_call"])
        return None, {}

    monkeypatch.setattr(evaluation, "evaluate_benchmarks", fake)
    monkeypatch.setattr(evaluation, "flat_metrics", lambda data: {})
    task = types.SimpleNamespace(
        benchmarks={"b": []}, tokenizer=None, verify=None, encode_prompt=None, heldout=[]
    )
    c = get_default_config()
    for rows, expected in ((256, 256), (0, 1024)):
        c.sampling.max_rows_per_call = rows
        trainer.heldout_metrics(c, None, None, task, jax.random.key(0))
        assert seen[-1] == expected
    # The evaluation's KV caches do not outlive it (they would sit through the train steps).
    released = []
    sampler = types.SimpleNamespace(release_buffers=lambda: released.append(True))
    trainer.heldout_metrics(c, sampler, None, task, jax.random.key(0))
    assert released == [True]


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax

        return hasattr(_jax, "make_gloo_tcp_collectives")
    except ImportError:
        return False


@pytest.mark.skipif(not _gloo_available(), reason="no gloo CPU collectives (multi-process)")
def test_two_process_run_from_the_command_line(tmp_path, env):
    """`experiments.train` as 2 processes x 2 CPU devices joined by jax.distributed on localhost,
    from an empty work dir (tokenizer, warm start, RL, checkpoint): both finish, process 0 alone
    writes the metrics and prints the result. (jax.distributed used to start after the first JAX
    call, which made every process fail at start-up.) The parameters are split over the two
    processes (fsdp 4 over 2 x 2 devices): saving the warm start gathers them, which every
    process must join (process 0 alone used to wait there forever)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "mp"
    e = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = []
    for pid in range(2):
        cmd = command(
            workdir,
            "--config.train.num_steps=2",
            "--config.mesh.data=1",
            "--config.mesh.fsdp=4",
            f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={pid}",
        )
        log = open(tmp_path / f"log_{pid}.txt", "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=log, stderr=log), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=600)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = [(tmp_path / f"log_{pid}.txt").read_text() for pid in range(2)]
    for proc, text in zip((p for p, _ in procs), logs, strict=True):
        assert proc.returncode == 0, text[-3000:]
    assert [r["step"] for r in read_metrics(workdir)] == [0, 1]
    assert "before RL ->" in logs[0] and "before RL ->" not in logs[1]
    assert sorted(os.listdir(workdir / "checkpoints"))[-1] == "2"
    assert (workdir / "sft_model" / "config.json").exists()


def test_a_budget_the_row_shards_cannot_split_stops_before_the_warm_start(monkeypatch, tmp_path):
    """B = prompts_per_step x rollouts_per_prompt must split over mesh.data * mesh.fsdp: the
    sampler pads its rows to a multiple of the shards, and the update could not split the
    padded batch. arith_tiny's 128 rollouts on 6 devices failed with a traceback after the
    warm start and the first evaluation; now one message at the start names the fields."""
    import jax

    from dynamo_jax import sharding as shd
    from dynamo_jax import trainer
    from dynamo_jax.config import get_default_config

    c = get_default_config()
    c.prompts_per_step, c.rollouts_per_prompt = 8, 16
    six = shd.make_mesh(data=-1, fsdp=1, tensor=1, devices=jax.devices()[:6])
    with pytest.raises(trainer.RunError) as err:
        trainer.check_mesh_fits(c, six)
    msg = str(err.value)
    assert "The step's 128 rollouts (prompts_per_step = 8 x rollouts_per_prompt = 16)" in msg
    assert "6 row shards (mesh.data = 6 x mesh.fsdp = 1, on 6 devices)" in msg
    assert "one of [1, 2]" in msg and "a multiple of 6" in msg
    trainer.check_mesh_fits(c, shd.make_mesh(data=2, fsdp=1, tensor=3, devices=jax.devices()[:6]))

    # In a run: before the task is built (8 devices, 20 rollouts).
    c.prompts_per_step, c.rollouts_per_prompt = 5, 4
    c.allocation.n_low, c.allocation.n_high = 2, 8
    c.train.num_minibatches, c.train.micro_batch_rows = 1, 20
    monkeypatch.setattr(trainer, "build_task", lambda *a: pytest.fail("built the task"))
    with pytest.raises(trainer.RunError, match="The step's 20 rollouts .* 8 row shards"):
        trainer.train(c, str(tmp_path), progress=False, log=lambda msg: None)


def test_compilations_metric_leaves_out_checkpoint_saving(tmp_path):
    """On several devices Orbax compiles slicing programs the first time it saves the state;
    the `compilations` metric counted them, so a run that never recompiled its step looked as
    if it had after its first checkpoint (35 -> 115 on 8 devices)."""
    import jax

    from dynamo_jax import trainer

    assert jax.device_count() == 8  # tests/conftest.py
    c = _in_process_config(
        **{"train.num_minibatches": 1, "train.micro_batch_rows": 32, "train.num_steps": 3},
        checkpoint_every=1,
        log_every=1,
    )
    trainer.train(c, str(tmp_path), progress=False, log=lambda msg: None)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    counts = [r["compilations"] for r in rows if "compilations" in r]
    assert len(counts) == 3 and counts[0] > 0 and len(set(counts)) == 1, counts


def test_a_run_names_the_parameter_dimensions_its_mesh_leaves_whole(tmp_path):
    """Dimensions a mesh axis does not divide are held whole on every device of that axis
    (sharding.py); the run says which, once, instead of leaving the memory to surprise."""
    from dynamo_jax import trainer

    c = _in_process_config(
        **{"train.num_minibatches": 1, "train.micro_batch_rows": 32, "train.num_steps": 1},
        **{"mesh.data": 1, "mesh.tensor": 8},
    )
    logged = []
    trainer.train(c, str(tmp_path), progress=False, log=logged.append)
    notes = [m for m in logged if m.startswith("note: these parameter dimensions")]
    assert len(notes) == 1 and "not over tensor (8)" in notes[0], logged
    assert "  embed: dim 0 (18) not over tensor (8)" in notes[0].splitlines()
