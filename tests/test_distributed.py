"""Multi-process training through jax.distributed on localhost (CPU, gloo collectives).

Launches tests/distributed_worker.py as (a) 2 processes x 2 CPU devices joined by
jax.distributed and (b) 1 process x 4 devices, both on a (data 1, fsdp 2, tensor 2) mesh whose
fsdp axis spans the two processes in (a). Each runs 2 RL steps (logprobs + update) on the same
seeded batches and saves an Orbax checkpoint. The test restores both checkpoints onto a 4-device
mesh in this process and checks that parameters, optimizer state and step agree, and that the
per-step metrics match.

Tolerance: 1e-6 absolute on parameters / moments and 1e-6 relative on metrics. Both runs compile
the same partitioned program (same mesh shape and device order); only the collectives'
transport differs (gloo over TCP vs in-process), and every cross-device reduction here has 2
participants, so the results are in practice bit-identical (observed max difference 0).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 240  # per worker; a cold compile takes ~50 s on 2 busy cores
ATOL = 1e-6
STEPS = 2


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax

        return hasattr(_jax, "make_gloo_tcp_collectives")
    except ImportError:
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not _gloo_available(), reason="this jaxlib has no gloo CPU collectives (multi-process)"
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(out: Path, env: dict, devices: int, num_processes: int, process_id: int, port: int):
    cmd = [sys.executable, str(WORKER), "--out", str(out), "--steps", str(STEPS)]
    cmd += ["--devices_per_process", str(devices)]
    if num_processes > 1:
        cmd += ["--num_processes", str(num_processes), "--process_id", str(process_id)]
        cmd += ["--coordinator", f"localhost:{port}"]
    log = open(out / f"log_{process_id}.txt", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def _wait_all(procs, timeout_s):
    """Waits for every (proc, log); kills all of them if any is still running at the deadline."""
    deadline = time.monotonic() + timeout_s
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return [proc.returncode for proc, _ in procs]


def _logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("log_*")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest's 8 devices; the worker sets its own count
    env["JAX_PLATFORMS"] = "cpu"
    # Persistent across pytest runs (.pytest_cache is git-ignored): the test takes ~80 s with a
    # cold compile cache, ~30 s with a warm one.
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    cache_dir = cache.mkdir("jax_distributed_cache") if cache else tmp_path_factory.mktemp("cc")
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    multi = tmp_path_factory.mktemp("multi_2x2")
    single = tmp_path_factory.mktemp("single_1x4")
    port = _free_port()
    # All three processes at once: the two runs compile different programs, so running them
    # side by side shortens the wall time even on 2 cores.
    procs = [_launch(multi, env, 2, 2, i, port) for i in range(2)]
    procs.append(_launch(single, env, 4, 1, 0, port))
    codes = _wait_all(procs, TIMEOUT_S)
    assert codes[2] == 0, f"single-process run failed ({codes[2]}):\n{_logs(single)}"
    assert codes[:2] == [0, 0], f"2-process run failed ({codes[:2]}):\n{_logs(multi)}"
    return multi, single


def _restore(out: Path, target):
    from dynamo_jax.checkpoint import RunCheckpointer

    ckpt = RunCheckpointer(out / "ckpt")
    assert ckpt.latest_step() == STEPS
    state, host = ckpt.restore(STEPS, target)
    ckpt.close()
    return state, host


def test_two_processes_equal_one_process(runs):
    from distributed_worker import build

    from dynamo_jax import sharding as shd

    multi, single = runs
    meta_m = json.loads((multi / "metrics.json").read_text())
    meta_s = json.loads((single / "metrics.json").read_text())
    assert (meta_m["process_count"], meta_m["device_count"]) == (2, 4)
    assert (meta_s["process_count"], meta_s["device_count"]) == (1, 4)
    assert len(meta_m["metrics"]) == len(meta_s["metrics"]) == STEPS
    for m, s in zip(meta_m["metrics"], meta_s["metrics"], strict=True):
        assert m.keys() == s.keys()
        for k in m:
            assert m[k] == pytest.approx(s[k], rel=1e-6, abs=1e-7), k

    mesh = shd.make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    _, fresh = build(mesh)  # restore target: same tree, shapes and shardings
    init_params = [np.asarray(x) for x in jax.tree.leaves(fresh.params)]
    state_m, host_m = _restore(multi, fresh)
    state_s, host_s = _restore(single, fresh)
    assert host_m == {"steps": STEPS, "processes": 2}
    assert host_s == {"steps": STEPS, "processes": 1}
    assert int(state_m.step) == int(state_s.step) == STEPS

    leaves_m = jax.tree.leaves_with_path(state_m)
    leaves_s = jax.tree.leaves(state_s)
    assert len(leaves_m) == len(leaves_s) > 3
    for (path, a), b in zip(leaves_m, leaves_s, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), atol=ATOL, rtol=0, err_msg=jax.tree_util.keystr(path)
        )
    # the checkpoints hold trained parameters, not the initial ones
    moved = [
        float(np.max(np.abs(np.asarray(a) - b)))
        for a, b in zip(jax.tree.leaves(state_m.params), init_params, strict=True)
    ]
    assert max(moved) > 1e-3
    # and restore into the 4-device layout (parameters split over fsdp and tensor)
    embed = state_m.params["embed"].get_value()
    assert len(embed.sharding.device_set) == 4 and not embed.sharding.is_fully_replicated
