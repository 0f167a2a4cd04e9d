"""The paper's run configs (Qwen2.5-Math-1.5B / 7B x DynaMO / GRPO): they validate, carry the SPEC 5
settings, fail at run start with the missing paths named, and their sharding plan fits.

The plan check builds the full-size model abstractly (``nnx.eval_shape``: no weights), lowers and
compiles the train-step update for the config's mesh on the 8 simulated CPU devices of
tests/conftest.py (``mesh.fsdp = -1`` -> fsdp 8), and reads the per-device sizes from
``compiled.memory_analysis()``. Nothing of model size is ever allocated; a compile takes ~4-8 s.

Run with ``-s`` to see the numbers. The slow cases compile a full-length micro-batch (prompt 1024 +
response 3072 tokens, one row per device) on 64 simulated devices (the intended TPU pod) in a
subprocess. Any case by hand (the device count comes from XLA_FLAGS; rows default to one per
device):

    XLA_FLAGS=--xla_force_host_platform_device_count=64 JAX_PLATFORMS=cpu \\
        python tests/test_paper_configs.py --model 7b --prompt 1024 --response 3072
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when run as a script
    sys.path.insert(0, str(ROOT))

from dynamo_jax import config as config_lib  # noqa: E402
from dynamo_jax import math_task  # noqa: E402
from dynamo_jax.memory_plan import compile_update  # noqa: E402
from dynamo_jax.models import ModelConfig  # noqa: E402

GiB = 2**30
CONFIGS = {
    ("1.5b", "dynamo"): "qwen2_5_math_1_5b_dynamo.py",
    ("1.5b", "grpo"): "qwen2_5_math_1_5b_grpo.py",
    ("7b", "dynamo"): "qwen2_5_math_7b_dynamo.py",
    ("7b", "grpo"): "qwen2_5_math_7b_grpo.py",
}
# Parameter counts of the released checkpoints (embeddings included; 1.5B ties its LM head).
NUM_PARAMS = {"1.5b": 1_543_714_304, "7b": 7_615_616_512}


def load_config(model: str, method: str):
    path = ROOT / "configs" / CONFIGS[(model, method)]
    spec = importlib.util.spec_from_file_location(f"paper_{model}_{method}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,method", sorted(CONFIGS))
def test_paper_config_validates_with_spec5_settings(model, method):
    c = load_config(model, method)
    config_lib.validate(c)
    assert (c.prompts_per_step, c.rollouts_per_prompt) == (512, 16)
    assert (c.allocation.n_low, c.allocation.n_high) == (8, 24)
    assert (c.sampling.temperature, c.sampling.top_p, c.sampling.top_k) == (1.0, 1.0, 0)
    assert c.sampling.max_new_tokens == 3072
    assert c.train.num_minibatches == 16
    o = c.optim
    assert (o.learning_rate, o.warmup_steps, o.weight_decay, o.grad_clip_norm) == (
        1e-6,
        10,
        0.1,
        1.0,
    )
    assert c.data.task == "math" and c.model.path == "" and c.data.train_path == ""
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, -1, 1)
    assert c.model.param_dtype == "float32"  # lr 1e-6 updates vanish in bfloat16 weights
    arch = ModelConfig.from_hf_dict(c.model.architecture.to_dict())
    # prompt + response must fit the released models' context
    assert max(c.buckets.prompt_len) + c.sampling.max_new_tokens <= arch.max_position_embeddings
    if method == "dynamo":
        assert c.allocation.mode == "variance" and c.modulation.comp and c.modulation.stab
        assert c.loss.eps_high == 0.28
    else:
        assert c.allocation.mode == "uniform" and not c.modulation.comp
        assert not c.modulation.stab and c.loss.eps_high == 0.2


def test_paper_architectures_match_the_released_models():
    small = ModelConfig.from_hf_dict(load_config("1.5b", "dynamo").model.architecture.to_dict())
    big = ModelConfig.from_hf_dict(load_config("7b", "grpo").model.architecture.to_dict())
    assert (small.hidden_size, small.num_layers, small.num_heads, small.num_kv_heads) == (
        1536,
        28,
        12,
        2,
    )
    assert (small.intermediate_size, small.vocab_size, small.tie_word_embeddings) == (
        8960,
        151936,
        True,
    )
    assert (big.hidden_size, big.num_layers, big.num_heads, big.num_kv_heads) == (3584, 28, 28, 4)
    assert (big.intermediate_size, big.vocab_size, big.tie_word_embeddings) == (
        18944,
        152064,
        False,
    )
    assert small.qkv_bias and big.qkv_bias and small.rope_theta == big.rope_theta == 10000.0


def test_missing_paths_fail_at_run_start_naming_the_fields(tmp_path):
    config = load_config("1.5b", "dynamo")  # get_config() itself does not check paths
    with pytest.raises(config_lib.ConfigError) as err:
        math_task.build_math_task(config, str(tmp_path), verifier_workers=0)
    msg = str(err.value)
    assert "data.train_path is required for data.task='math'" in msg
    assert "--config.data.train_path=/path/train.jsonl" in msg
    assert "model.path is required for data.task='math'" in msg
    assert "--config.model.path=" in msg
    config.model.path = str(tmp_path / "missing_model")
    config.data.train_path = str(tmp_path / "missing.jsonl")
    with pytest.raises(config_lib.ConfigError) as err:
        math_task.require_math_paths(config)
    msg = str(err.value)
    assert "data.train_path=" in msg and "missing.jsonl" in msg and "no such file" in msg
    assert "model.path=" in msg and "has no config.json" in msg


# ------------------------------------------------------------------------------------------------
# Sharding plan: abstract model, compiled update, per-device memory
# ------------------------------------------------------------------------------------------------
def memory_report(compiled, info, label: str) -> dict:
    m = compiled.memory_analysis()
    out = {
        "label": label,
        **info,
        "argument_gib": m.argument_size_in_bytes / GiB,
        "temp_gib": m.temp_size_in_bytes / GiB,
        "output_gib": m.output_size_in_bytes / GiB,
        "alias_gib": m.alias_size_in_bytes / GiB,
    }
    # Outputs alias the donated state, so arguments + temporaries is the peak.
    out["peak_gib"] = out["argument_gib"] + out["temp_gib"]
    print(
        f"\n{label}: mesh {info['mesh']}, per device: arguments {out['argument_gib']:.2f} GiB "
        f"(params + Adam moments), temporaries {out['temp_gib']:.2f} GiB, "
        f"total {out['peak_gib']:.2f} GiB; compiled in {info['seconds']:.1f} s"
    )
    return out


# Budgets: what the per-device program must fit (HBM per chip).
V5E = 16.0  # TPU v5e / v4 per TensorCore
V4 = 32.0  # TPU v4 chip; an A100/H100 has 40-80


@pytest.mark.parametrize("model,budget_gib", [("1.5b", V5E), ("7b", V4)])
def test_full_size_update_plan_on_8_devices(model, budget_gib):
    config = load_config(model, "dynamo")
    compiled, info = compile_update(config, rows=16, prompt_len=64, response_len=64)
    report = memory_report(compiled, info, f"Qwen2.5-Math-{model} update, 16 x (64 + 64) tokens")
    assert info["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert info["num_params"] == NUM_PARAMS[model]
    # The sharding plan: float32 params + two Adam moments (12 bytes / param), split 8 ways.
    expected = 12 * NUM_PARAMS[model] / 8 / GiB
    assert report["argument_gib"] == pytest.approx(expected, rel=0.01)
    assert report["peak_gib"] < budget_gib


@pytest.mark.slow
def test_full_length_micro_batch_on_64_devices_fits_v5e(tmp_path):
    """The intended pod: 64 chips of 16 GiB (a TPU v5e-64), in one subprocess with 64 simulated
    CPU devices (the pytest process has 8); both models."""
    out = tmp_path / "report.json"
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=64"
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, __file__, "--model", "1.5b", "7b", "--prompt", "1024"]
    cmd += ["--response", "3072", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout)
    reports = json.loads(out.read_text())
    for model, report in zip(["1.5b", "7b"], reports, strict=True):
        assert report["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
        expected = 12 * NUM_PARAMS[model] / 64 / GiB
        assert report["argument_gib"] == pytest.approx(expected, rel=0.01)
        assert report["peak_gib"] < V5E


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", choices=["1.5b", "7b"], default=["1.5b"])
    parser.add_argument("--method", choices=["dynamo", "grpo"], default="dynamo")
    parser.add_argument("--rows", type=int, default=None, help="default: one per device")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--response", type=int, default=3072)
    parser.add_argument("--out", default=None, help="write the reports as a JSON list here")
    args = parser.parse_args()
    reports = []
    for model in args.model:
        config = load_config(model, args.method)
        rows = args.rows or jax.device_count()
        compiled, info = compile_update(config, rows, args.prompt, args.response)
        label = f"Qwen2.5-Math-{model} {args.method} update, {rows} x ({args.prompt} + "
        reports.append(memory_report(compiled, info, label + f"{args.response}) tokens"))
        del compiled
    if args.out:
        Path(args.out).write_text(json.dumps(reports))


if __name__ == "__main__":
    main()
