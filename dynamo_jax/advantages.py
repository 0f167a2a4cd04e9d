"""Group advantages for ragged rollout groups (SPEC section 3).  [jit]

Every row carries `group_id` in [0, num_groups) and a `valid` flag from the moment it is created,
so groups of any size (the allocation gives prompt i n_i rows) are handled by segment sums over a
static number of groups: a new allocation changes index arrays, never shapes, and never recompiles.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dynamo_jax import baselines

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "w_reinforce")


class GroupStats(NamedTuple):
    """Per-group statistics over valid rows. All arrays are [num_groups] float32."""

    count: jax.Array  # number of valid rows in the group
    mean: jax.Array  # mean reward (0 for empty groups)
    std: jax.Array  # sample std, ddof=1 (0 for groups of size < 2)


def group_statistics(
    rewards: jax.Array, group_ids: jax.Array, valid: jax.Array, num_groups: int
) -> GroupStats:
    """Count, mean and ddof=1 standard deviation of the rewards of each group.

    Args:
      rewards: [rows] float; padding rows may hold anything.
      group_ids: [rows] int in [0, num_groups) (padding rows may hold any id: they are ignored).
      valid: [rows] bool; False marks padding rows.
      num_groups: static number of groups.
    """
    w = valid.astype(jnp.float32)
    r = jnp.where(valid, rewards.astype(jnp.float32), 0.0)
    ids = jnp.where(valid, group_ids, num_groups)  # out of range: dropped by segment_sum
    seg = functools.partial(jax.ops.segment_sum, segment_ids=ids, num_segments=num_groups)
    count = seg(w)
    mean = seg(r) / jnp.maximum(count, 1.0)
    # Two-pass variance: numerically safer than E[r^2] - E[r]^2.
    centered = jnp.where(valid, r - mean[jnp.clip(group_ids, 0, num_groups - 1)], 0.0)
    var = seg(centered * centered) / jnp.maximum(count - 1.0, 1.0)
    std = jnp.where(count >= 2, jnp.sqrt(var), 0.0)
    return GroupStats(count=count, mean=mean, std=std)


@functools.partial(jax.jit, static_argnames=("num_groups", "estimator"))
def group_advantages(
    rewards: jax.Array,
    group_ids: jax.Array,
    valid: jax.Array,
    num_groups: int,
    estimator: str = "grpo",
    eps: float = 1e-6,
    positive_weight: float = 0.1,
) -> jax.Array:
    """Row advantages for ragged groups (SPEC 3).

    - `grpo`:    A = (R - mean_g) / (std_g + eps), std with ddof=1;
    - `dr_grpo`: A = R - mean_g;
    - `rloo`:    A = R - mean of the other rows of the group;
    - `w_reinforce` (a baseline, SPEC 6): no group baseline, A = positive_weight * R for R > 0 and
      A = R otherwise (`baselines.w_reinforce_advantages`); singletons keep their advantage.
    A group of size 1 (except in `w_reinforce`) and every padding row get A = 0 (never NaN).

    Args:
      rewards: [rows] float rewards.
      group_ids: [rows] int32 group index in [0, num_groups).
      valid: [rows] bool, False for padding rows.
      num_groups: static; the number of prompts of the step (a bucket size, not data dependent).
      estimator: one of "grpo", "dr_grpo", "rloo".
      eps: added to the std in `grpo`.
      positive_weight: lambda of `w_reinforce`.

    Returns:
      [rows] float32 advantages; broadcast them over the row's response tokens.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage estimator {estimator!r}; choose one of {ESTIMATORS}.")
    if estimator == "w_reinforce":
        return baselines.w_reinforce_advantages(rewards, valid, positive_weight)
    stats = group_statistics(rewards, group_ids, valid, num_groups)
    gid = jnp.clip(group_ids, 0, num_groups - 1)
    count, mean, std = stats.count[gid], stats.mean[gid], stats.std[gid]
    r = rewards.astype(jnp.float32)
    if estimator == "grpo":
        adv = (r - mean) / (std + eps)
    elif estimator == "dr_grpo":
        adv = r - mean
    else:  # rloo: mean of the others = (sum - r) / (count - 1)
        loo_mean = (mean * count - r) / jnp.maximum(count - 1.0, 1.0)
        adv = r - loo_mean
    return jnp.where(valid & (count >= 2), adv, 0.0)


def zero_variance_fraction(
    rewards: jax.Array, group_ids: jax.Array, valid: jax.Array, num_groups: int
) -> jax.Array:
    """Share of valid rows whose group has all-equal rewards (they carry no GRPO signal).

    rewards [rows] float, group_ids [rows] int in [0, num_groups), valid [rows] bool ->
    float32 scalar in [0, 1]; 0 when no row is valid."""
    stats = group_statistics(rewards, group_ids, valid, num_groups)
    gid = jnp.clip(group_ids, 0, num_groups - 1)
    in_zero_var = valid & (stats.std[gid] == 0.0)
    return jnp.sum(in_zero_var) / jnp.maximum(jnp.sum(valid), 1)
