"""One process of the multi-process train-step check (launched by tests/test_distributed.py).

    python tests/distributed_worker.py --out DIR --devices_per_process 4             # 1 x 4
    python tests/distributed_worker.py --out DIR --devices_per_process 2 \\
        --num_processes 2 --process_id I --coordinator localhost:PORT              # 2 x 2

Builds a tiny Qwen2 policy on a (data 1, fsdp 2, tensor 2) mesh over all global devices, runs
two RL steps (`TrainStep.logprobs` for old_logp, then `TrainStep.update`) on the same seeded
host batch in every process, saves the train state with RunCheckpointer (every process calls
save; Orbax writes each shard once) and, from process 0, the per-step metrics as JSON.

With 2 processes the devices are ordered (p0d0, p0d1, p1d0, p1d1), so the fsdp axis spans the
two processes: parameters are split along "embed" *across* processes, the batch rows too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--devices_per_process", type=int, default=4)
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--coordinator", default=None)
    p.add_argument("--steps", type=int, default=2)
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()
    # Before jax is imported: the pytest process exports XLA_FLAGS with 8 host devices.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices_per_process}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dynamo_jax import config as config_lib  # noqa: E402
from dynamo_jax import sharding as shd  # noqa: E402
from dynamo_jax import train_step as ts  # noqa: E402
from dynamo_jax.checkpoint import RunCheckpointer  # noqa: E402
from dynamo_jax.models import ModelConfig, init_model  # noqa: E402

R, P, M, GROUPS = 16, 6, 5, 4
MODEL_CFG = ModelConfig.from_hf_dict(
    dict(
        model_type="qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
)


def make_config():
    cfg = config_lib.get_default_config()
    cfg.train.num_minibatches = 2
    cfg.train.micro_batch_rows = 4
    cfg.optim.learning_rate = 1e-2
    cfg.optim.warmup_steps = 0
    cfg.optim.eps = 1e-3
    cfg.sampling.max_new_tokens = M
    return cfg


def make_batch(seed):
    """The same seeded host batch in every process (as the trainer builds it)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, P + 1, R)
    prompts = np.where(np.arange(P)[None] < lens[:, None], rng.integers(1, 64, (R, P)), 0)
    resp = rng.integers(1, 64, (R, M))
    rmask = (np.arange(M)[None] < rng.integers(1, M + 1, R)[:, None]).astype(np.float32)
    b = ts.batch_from_rollouts(prompts, lens, resp, rmask, pad_id=0)
    b["rewards"] = rng.choice([-1.0, 1.0], R).astype(np.float32)
    b["group_ids"] = np.repeat(np.arange(GROUPS), (3, 5, 2, 6)).astype(np.int32)
    b["valid"] = np.ones(R, bool)
    return b


def build(mesh):
    """(TrainStep, fresh TrainState) for the tiny model on `mesh` (also used by the test to make
    the restore target)."""
    cfg = make_config()
    model = init_model(MODEL_CFG, 0, mesh=mesh)
    tx = ts.make_optimizer(cfg)
    graphdef, rest, state = ts.init_train_state(model, tx)
    settings = ts.StepSettings.from_config(cfg, num_groups=GROUPS)
    step = ts.TrainStep(
        graphdef,
        rest,
        tx,
        settings,
        state_shardings=ts.state_shardings(state),
        batch_sharding=shd.batch_sharding(mesh),
    )
    return step, state


def main(args):
    t0 = time.perf_counter()
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    # Cross-process collectives on CPU: gloo over TCP (the jax 0.10 default, set explicitly;
    # read when the CPU backend starts, i.e. after jax.distributed.initialize).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    multi = args.num_processes > 1
    if multi:
        shd.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    times = {"distributed_init": time.perf_counter() - t0}
    assert jax.process_count() == args.num_processes, jax.process_count()
    assert jax.local_device_count() == args.devices_per_process, jax.local_devices()
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = shd.make_mesh(data=1, fsdp=2, tensor=2, devices=devices)
    step_fn, state = build(mesh)
    if multi:  # the check is about parameters split across processes
        embed = state.params["embed"].get_value()
        assert not embed.is_fully_addressable, embed.sharding
    times["build"] = time.perf_counter() - t0 - sum(times.values())
    metrics_log = []
    for i in range(args.steps):
        batch = make_batch(seed=10 + i)
        # Device arrays pass through put_batch: old_logp stays a global array (as in trainer.py).
        batch["old_logp"] = step_fn.logprobs(state.params, batch).logp
        state, metrics = step_fn.update(state, batch, jax.random.key(1))
        metrics_log.append({k: float(v) for k, v in metrics.items()})
    times["steps"] = time.perf_counter() - t0 - sum(times.values())
    ckpt = RunCheckpointer(os.path.join(args.out, "ckpt"), keep=1)
    ckpt.save(args.steps, state, {"steps": args.steps, "processes": args.num_processes})
    ckpt.close()
    times["save"] = time.perf_counter() - t0 - sum(times.values())
    if jax.process_index() == 0:
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(
                {
                    "metrics": metrics_log,
                    "process_count": jax.process_count(),
                    "device_count": jax.device_count(),
                    "seconds": times,
                },
                f,
            )
    if multi:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(ARGS)
