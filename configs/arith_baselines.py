"""The embedded arithmetic run with one of the SPEC 6 baselines (or DynaMO) as a preset.

    python -m experiments.train --config configs/arith_baselines.py:clip_cov --workdir runs/cc

Names: dynamo, grpo, clip_higher, entropy_loss, fork_tokens, entropy_advantages, clip_cov, kl_cov,
w_reinforce, dr_grpo (dynamo_jax/baselines.py, formulas in docs/BASELINES.md). Without a name
this is DynaMO. Any field can still be overridden with --config.a.b=value.
"""

from configs import arith_tiny
from dynamo_jax import baselines


def get_config(name: str = "dynamo"):
    return baselines.apply_preset(arith_tiny.get_config(), name or "dynamo")
