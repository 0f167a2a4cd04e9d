"""The memory planner (`dynamo_jax.memory_plan`, `python -m experiments.plan_memory`): per-device
sizes that follow from the sharding plan, the sampler's cache from the shapes, and a CLI that
says whether a config fits and which fields to change. Nothing of model size is allocated."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from dynamo_jax import memory_plan
from dynamo_jax.models import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_plan_of_the_paper_1_5b_config_on_8_devices():
    """The 1.5B DynaMO config (fsdp over the 8 test devices, float32 master weights, bfloat16
    compute), shortened so that the compile is quick: every number checked against the shapes."""
    c = load("qwen2_5_math_1_5b_dynamo")
    c.buckets.prompt_len, c.sampling.max_new_tokens = (64,), 64
    c.prompts_per_step, c.rollouts_per_prompt = 4, 8  # a step of 32 rows
    c.train.num_minibatches, c.train.micro_batch_rows, c.sampling.max_rows_per_call = 2, 8, 32
    plan = memory_plan.plan_memory(c)
    assert jax.device_count() == 8
    assert plan.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    n = 1_543_714_304
    assert plan.num_params == n
    # float32 params + two AdamW moments, split 8 ways (every large axis divides by 8)
    assert plan.state_gib == pytest.approx(12 * n / 8 / GiB, rel=1e-3)
    # + the step's batch (32 rows, split over the 8 devices): ids, positions, attention mask;
    # targets, response mask, old log-probs; rewards, group ids, valid; + a few scalars (the step
    # counters, the key): to the byte
    batch = (32 * 128 * (4 + 4 + 1) + 32 * 64 * (4 + 4 + 4) + 32 * (4 + 4 + 1)) / 8
    extra = plan.update_arguments_gib * GiB - plan.state_gib * GiB - batch
    assert 0 <= extra <= 64
    assert plan.step_rows == 32 and plan.micro_batch_rows == 8
    assert 0 < plan.update_temporaries_gib < 16
    assert plan.update_peak_gib == plan.update_arguments_gib + plan.update_temporaries_gib
    # sampler: 32 rows over the 8 row shards, 2 kv heads x 128 dims, 28 layers, k and v, bf16
    arch = ModelConfig.from_hf_dict(c.model.architecture.to_dict())
    cache = 2 * arch.num_layers * (32 // 8) * 2 * 128 * 128 * 2
    assert plan.sampling_rows == 32 and plan.positions == 128
    assert plan.sampling_cache_gib * GiB == pytest.approx(cache)
    assert plan.sampling_weights_gib == pytest.approx(2 * n / 8 / GiB, rel=1e-3)  # bf16 copy
    table = plan.table()
    assert "1.544B parameters on 8 devices" in table and "update: peak" in table

    c.model.dtype = "float32"  # the cache in float32, the decode's weight copy too
    c.model.architecture.num_hidden_layers = 2
    # 30 rows per call: the sampler rounds them to 32 to split over the 8 row shards (planned
    # unrounded, 30 rows did not divide and were counted whole on every device)
    c.sampling.max_rows_per_call = 30
    small = memory_plan.plan_memory(c)
    # The decode slices the layer weights for its loop: a float32 copy even with float32
    # compute (XLA's memory analysis of the decode on an H100: 1.00x the layer stack).
    assert small.sampling_weights_gib == pytest.approx(4 * small.num_params / 8 / GiB, rel=1e-2)
    assert small.sampling_rows == 32
    assert small.sampling_cache_gib * GiB == pytest.approx(2 * 2 * 4 * 2 * 128 * 128 * 4)


def test_model_config_needs_a_vocabulary_or_a_model_folder(tmp_path):
    c = load("arith_tiny")
    with pytest.raises(ValueError, match="model.architecture.vocab_size is not set"):
        memory_plan.model_config(c)
    c.model.path = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        memory_plan.model_config(c)
    arch = dict(c.model.architecture.to_dict(), vocab_size=40, model_type="qwen2")
    (tmp_path / "config.json").write_text(json.dumps(arch))
    assert memory_plan.model_config(c).vocab_size == 40


def plan_cli(*args):
    cmd = [sys.executable, "-m", "experiments.plan_memory", "--config", "configs/arith_tiny.py"]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_plan_memory_cli_says_whether_it_fits():
    over = plan_cli("--vocab_size", "32", "--devices", "4", "--hbm_gib", "0.0001")
    assert over.returncode == 1, over.stderr
    assert "on 4 devices (mesh data 4, fsdp 1, tensor 1)" in over.stdout
    assert "does NOT fit" in over.stdout
    assert "model.remat=True (now False)" in over.stdout
    assert "Try, in this order: model.remat=True;" in over.stdout
    peak = float(over.stdout.split("does NOT fit: peak ")[1].split(" GiB")[0])
    assert 0 < peak < 1
    fits = plan_cli("--vocab_size", "32", "--devices", "4", "--hbm_gib", "16")
    assert fits.returncode == 0, fits.stderr
    assert f"fits: peak {peak:.2f} GiB <= 16 GiB per device" in fits.stdout
    missing = plan_cli("--devices", "2")
    assert missing.returncode == 1 and "--vocab_size N" in missing.stderr


def test_suggest_fit_finds_the_largest_micro_batch_that_fits():
    """The search compiles each candidate (the divisors of the rows per update, multiples of the
    8 row shards, from the config's value down) and returns the first that fits. The peak is
    not proportional to the micro-batch (accumulation buffers, XLA's scheduling), which is why it
    compiles rather than scales a formula."""
    c = load("qwen2_5_math_1_5b_dynamo")  # remat on; a 2-layer cut of it, 64-row steps
    c.model.architecture.num_hidden_layers = 2
    c.buckets.prompt_len, c.sampling.max_new_tokens = (64,), 64
    c.prompts_per_step, c.rollouts_per_prompt = 8, 8
    c.train.num_minibatches, c.sampling.max_rows_per_call = 1, 32
    plans = {}
    for micro in (32, 16):
        c.train.micro_batch_rows = micro
        plans[micro] = memory_plan.plan_memory(c)
    assert plans[32].peak_gib > plans[16].peak_gib
    c.train.micro_batch_rows = 32
    tried = []
    fields, plan = memory_plan.suggest_fit(
        c, (plans[32].peak_gib + plans[16].peak_gib) / 2, log=tried.append
    )
    assert fields == {"train.micro_batch_rows": 16, "model.remat": True}
    assert plan.peak_gib == pytest.approx(plans[16].peak_gib)
    assert [t.split(":")[0] for t in tried] == [
        "  micro_batch_rows=32, remat=True",
        "  micro_batch_rows=16, remat=True",
    ]
    # below what sampling alone needs, no micro-batch can help: one try, then None
    tried.clear()
    assert memory_plan.suggest_fit(c, plans[16].sampling_peak_gib / 2, log=tried.append) is None
    assert len(tried) == 1
