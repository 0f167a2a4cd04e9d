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
import numpy as np

from dynamo_jax import baselines, checks

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
        Under jit a valid row with an id outside the range counts as padding; called on
        concrete arrays, `group_advantages` raises a ValueError naming the row instead.
      valid: [rows] bool; False marks padding rows.
      num_groups: static number of groups.
    A group whose rewards are all equal gets exactly that mean and std 0.
    """
    c = _centered_statistics(rewards, group_ids, valid, num_groups)
    return GroupStats(count=c.count, mean=c.shift + c.mean, std=c.std)


class _Centered(NamedTuple):
    count: jax.Array  # [num_groups] valid rows per group
    shift: jax.Array  # [num_groups] the group's largest valid reward (0 if empty)
    mean: jax.Array  # [num_groups] mean reward - shift
    std: jax.Array  # [num_groups] ddof=1 (0 below 2 rows)
    rewards: jax.Array  # [rows] reward - its group's shift (0 on padding)
    valid: jax.Array  # [rows] valid and the group id in range
    gid: jax.Array  # [rows] group id clipped into range (for gathers)


def _in_range(valid, group_ids, num_groups) -> jax.Array:
    """The valid rows (any nonzero `valid`: bool, int or float 0/1) whose group id is in
    [0, num_groups); the others count as padding."""
    return (jnp.asarray(valid) != 0) & (group_ids >= 0) & (group_ids < num_groups)


def _centered_statistics(rewards, group_ids, valid, num_groups) -> _Centered:
    """Group statistics of the rewards measured from each group's largest valid reward.

    Centering makes a group of equal rewards exactly constant (all 0): a float32 mean of, say,
    24 rewards of 0.1 is off by an ulp, which the GRPO division by (std + 1e-6) would blow up
    into advantages of ~0.01. A valid row whose id is out of range counts as padding."""
    valid = _in_range(valid, group_ids, num_groups)
    w = valid.astype(jnp.float32)
    ids = jnp.where(valid, group_ids, num_groups)  # out of range: dropped by the segment ops
    gid = jnp.clip(group_ids, 0, num_groups - 1)
    seg = functools.partial(jax.ops.segment_sum, segment_ids=ids, num_segments=num_groups)
    count = seg(w)
    r = jnp.where(valid, rewards.astype(jnp.float32), 0.0)
    shift = jax.ops.segment_max(r, ids, num_segments=num_groups)
    shift = jnp.where(count > 0, shift, 0.0)  # empty groups: -inf -> 0
    c = jnp.where(valid, r - shift[gid], 0.0)
    mean_c = seg(c) / jnp.maximum(count, 1.0)
    # Two-pass variance: numerically safer than E[r^2] - E[r]^2.
    centered = jnp.where(valid, c - mean_c[gid], 0.0)
    var = seg(centered * centered) / jnp.maximum(count - 1.0, 1.0)
    std = jnp.where(count >= 2, jnp.sqrt(var), 0.0)
    return _Centered(count, shift, mean_c, std, c, valid, gid)


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
      group_ids: [rows] int32 group index in [0, num_groups). Called on concrete arrays, a valid
        row with an id outside the range is a ValueError naming the row; inside jit (ids are
        traced) such a row counts as padding (A = 0).
      valid: [rows] bool, False for padding rows.
      num_groups: static; the number of prompts of the step (a bucket size, not data dependent).
      estimator: one of "grpo", "dr_grpo", "rloo", "w_reinforce".
      eps: added to the std in `grpo`.
      positive_weight: lambda of `w_reinforce`.

    Returns:
      [rows] float32 advantages; broadcast them over the row's response tokens.
    """
    checks.same_shape(
        "group_advantages", "rewards", dict(rewards=rewards, group_ids=group_ids, valid=valid)
    )
    if jnp.ndim(rewards) != 1:
        raise ValueError(
            f"group_advantages: rewards, group_ids and valid must be [rows]; got shape "
            f"{tuple(jnp.shape(rewards))}"
        )
    if num_groups < 1:
        raise ValueError(f"group_advantages: num_groups = {num_groups} must be >= 1")
    if checks.concrete(rewards, valid):
        r, ok = np.asarray(rewards, np.float64), np.asarray(valid) != 0
        bad = np.flatnonzero(ok & ~np.isfinite(r))
        if bad.size:
            raise ValueError(
                f"group_advantages: rewards[{bad[0]}] = {r[bad[0]]} on a valid row ({bad.size} "
                "such rows) would make its whole group's advantages NaN; give every valid row a "
                "finite reward, or mark it valid = False"
            )
    if estimator != "w_reinforce" and checks.concrete(group_ids, valid):  # it ignores the ids
        ids, ok = np.asarray(group_ids), np.asarray(valid, bool)
        bad = np.flatnonzero(ok & ((ids < 0) | (ids >= num_groups)))
        if bad.size:
            raise ValueError(
                f"group_advantages: group_ids[{bad[0]}] = {ids[bad[0]]} is outside "
                f"[0, num_groups = {num_groups}) on a valid row ({bad.size} such rows); give "
                f"each prompt an id below num_groups, or mark padding rows valid = False"
            )
    return _group_advantages(rewards, group_ids, valid, num_groups, estimator, eps, positive_weight)


@functools.partial(jax.jit, static_argnames=("num_groups", "estimator"))
def _group_advantages(
    rewards: jax.Array,
    group_ids: jax.Array,
    valid: jax.Array,
    num_groups: int,
    estimator: str = "grpo",
    eps: float = 1e-6,
    positive_weight: float = 0.1,
) -> jax.Array:
    """`group_advantages` after its argument checks (jitted)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage estimator {estimator!r}; choose one of {ESTIMATORS}.")
    if estimator == "w_reinforce":  # no group baseline: the ids play no part
        return baselines.w_reinforce_advantages(rewards, valid, positive_weight)
    c = _centered_statistics(rewards, group_ids, valid, num_groups)  # out of range: padding
    # r and mean are measured from the group's largest reward: the differences are the same,
    # and a group of equal rewards gets exactly 0.
    r, valid = c.rewards, c.valid
    count, mean, std = c.count[c.gid], c.mean[c.gid], c.std[c.gid]
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
    checks.same_shape(
        "zero_variance_fraction",
        "rewards",
        dict(rewards=rewards, group_ids=group_ids, valid=valid),
    )
    stats = group_statistics(rewards, group_ids, valid, num_groups)
    gid = jnp.clip(group_ids, 0, num_groups - 1)
    valid = _in_range(valid, group_ids, num_groups)  # as group_advantages counts them
    in_zero_var = valid & (stats.std[gid] == 0.0)
    return jnp.sum(in_zero_var) / jnp.maximum(jnp.sum(valid), 1)
