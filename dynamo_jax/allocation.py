"""Host-side rollout allocation (SPEC section 1). Plain numpy, no jax.

Pieces, in the order a step uses them:

- `PromptStats`: per-prompt history G_i (rollouts seen) and k_i (correct rollouts), keyed by the
  dataset's prompt id, with optional exponential decay (SPEC 1.1). Checkpointable via
  `state_dict()` / `PromptStats.from_state_dict()`.
- `bernoulli_variance(k, G)`: P_i = k_i (G_i - k_i) / (G_i (G_i - 1)) (SPEC 1.2).
- `allocation_weights(k, G, ...)`: w_i from P_i, with the unexplored rule (SPEC 1.2).
- `allocate_rollouts(weights, budget, n_low, n_high, mode=...)`: integer group sizes n_i
  (SPEC 1.3). `variance` is the exact integer minimiser of sum_i w_i^2 / n_i; `official`
  (`official_allocation`) reproduces the authors' verl rule; `uniform` is plain GRPO.
- `AllocationPolicy`: the config-level glue (mode, step/epoch refresh, bounds, weight knobs).

Tie breaking in `variance` mode (documented contract, tested): the allocation is the one the
greedy algorithm produces when, starting from n_i = n_low, it repeatedly gives one rollout to the
prompt with the largest marginal gain w_i^2 / (n_i (n_i + 1)), breaking exact ties by the smaller
current n_i and then by the lower prompt index. Marginal gains are computed in float64 from the
weights divided by max(w) (the allocation is scale invariant); relative weights below 1e-150 count
as zero. Consequences: zero-weight prompts get n_low unless the positive-weight prompts are all at
n_high, and equal (or all-zero) weights are spread as evenly as the bounds allow, the extra units
going to the lowest indices.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import operator
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "AllocationPolicy",
    "PromptStats",
    "allocate_rollouts",
    "allocation_objective",
    "allocation_weights",
    "bernoulli_variance",
    "check_budget",
    "continuous_allocation",
    "official_allocation",
    "official_priority",
]

MODES = ("variance", "official", "uniform")
REFRESH = ("step", "epoch")

# Official-code constants (SPEC 1.3, `official` mode).
OFFICIAL_MIN_HISTORY = 4
_OFFICIAL_EASY_ACC = 0.85
_OFFICIAL_FLOOR = 0.01
_OFFICIAL_TIEBREAK = 1e-6

# Relative weights below this are treated as exactly zero in `variance` mode, so that squared
# weights and marginal gains never underflow.
_TINY_RELATIVE_WEIGHT = 1e-150
# The threshold bisection stops once at most this many candidate units remain
# (_SELECT_PER_PROMPT * N + _SELECT_BASE); they are then ranked exactly. Tests set both to 0 to
# drive the bisection all the way down on small inputs.
_SELECT_PER_PROMPT = 2
_SELECT_BASE = 4096


# --------------------------------------------------------------------------------------------
# Variance proxy and weights (SPEC 1.2)
# --------------------------------------------------------------------------------------------


def _as_stats_arrays(k: Any, G: Any) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(k, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    if k.shape != G.shape:
        raise ValueError(f"k and G must have the same shape, got {k.shape} and {G.shape}")
    return k, G


def bernoulli_variance(k: Any, G: Any) -> np.ndarray:
    """Unbiased sample variance of 0/1 outcomes (SPEC 1.2).

    P_i = k_i (G_i - k_i) / (G_i (G_i - 1)) for G_i >= 2, and 0 where G_i < 2.

    Args:
      k: correct rollouts so far, float or int array of any shape (floats after decay).
      G: rollouts so far, same shape as `k`.

    Returns:
      float64 array of the same shape, >= 0 (decay round-off is clipped away). No warnings are
      emitted for G < 2.
    """
    k, G = _as_stats_arrays(k, G)
    ok = G >= 2.0
    num = k * (G - k)
    den = G * (G - 1.0)
    out = np.zeros(np.broadcast_shapes(k.shape, G.shape), dtype=np.float64)
    np.divide(num, den, out=out, where=ok)
    return np.maximum(out, 0.0)


def allocation_weights(
    k: Any,
    G: Any,
    *,
    min_history: float = 4,
    unexplored_weight: float | None = None,
    weight_exponent: float = 1.0,
    min_weight: float = 0.0,
) -> np.ndarray:
    """Allocation weights w_i (SPEC 1.2).

    w_i = unexplored_weight                      if G_i < min_history   (unexplored prompt)
    w_i = max(P_i, min_weight) ** weight_exponent otherwise, P_i = `bernoulli_variance(k, G)`.

    Args:
      k, G: float arrays of equal shape (see `bernoulli_variance`).
      min_history: prompts with fewer observed rollouts than this are unexplored.
      unexplored_weight: weight of unexplored prompts; None means (1/4) ** weight_exponent,
        the weight of a prompt believed to succeed half the time.
      weight_exponent: gamma >= 0 (1.0: the paper's P_i; 0.5: Neyman allocation on the std).
      min_weight: w_min >= 0, floor applied to P_i before the exponent.

    Returns:
      float64 array shaped like `G`, all entries finite and >= 0.
    """
    gamma = float(weight_exponent)
    if not (math.isfinite(gamma) and gamma >= 0.0):
        raise ValueError(f"weight_exponent must be finite and >= 0, got {weight_exponent}")
    w_min = float(min_weight)
    if not (math.isfinite(w_min) and w_min >= 0.0):
        raise ValueError(f"min_weight must be finite and >= 0, got {min_weight}")
    if unexplored_weight is None:
        u = 0.25**gamma
    else:
        u = float(unexplored_weight)
        if not (math.isfinite(u) and u >= 0.0):
            raise ValueError(f"unexplored_weight must be finite and >= 0, got {unexplored_weight}")
    k, G = _as_stats_arrays(k, G)
    w = np.maximum(bernoulli_variance(k, G), w_min) ** gamma
    return np.where(G < min_history, u, w)


def allocation_objective(weights: Any, n: Any) -> float:
    """sum_i w_i^2 / n_i: the batch gradient-variance proxy that `variance` mode minimises."""
    w = np.asarray(weights, dtype=np.float64)
    return float(np.sum(w * w / np.asarray(n, dtype=np.float64)))


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _as_int(x: Any, name: str) -> int:
    if isinstance(x, bool | np.bool_):
        raise TypeError(f"{name} must be an integer, got {x!r}")
    try:
        return operator.index(x)
    except TypeError:
        if isinstance(x, float | np.floating) and float(x).is_integer():
            return int(x)
        raise TypeError(f"{name} must be an integer, got {x!r}") from None


def check_budget(num_prompts: int, budget: int, n_low: int, n_high: int) -> tuple[int, int, int]:
    """Validate N * n_low <= B <= N * n_high, 1 <= n_low <= n_high (SPEC 1.3).

    Returns (budget, n_low, n_high) as Python ints. Raises ValueError naming the numbers.
    """
    N = _as_int(num_prompts, "num_prompts")
    B = _as_int(budget, "budget")
    lo = _as_int(n_low, "n_low")
    hi = _as_int(n_high, "n_high")
    if lo < 1:
        raise ValueError(f"n_low must be >= 1, got n_low={lo}")
    if lo > hi:
        raise ValueError(f"n_low={lo} is larger than n_high={hi}")
    if N * lo > B:
        raise ValueError(
            f"infeasible allocation: N * n_low = {N} * {lo} = {N * lo} exceeds the budget B = {B}"
        )
    if N * hi < B:
        raise ValueError(
            f"infeasible allocation: N * n_high = {N} * {hi} = {N * hi} is below the budget B = {B}"
        )
    return B, lo, hi


def _check_weights(weights: Any) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"weights must be 1-D, got shape {w.shape}")
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"weights must be finite and >= 0: weights[{i}] = {w[i]} ({bad.size} bad entries)"
        )
    return w


# --------------------------------------------------------------------------------------------
# `variance` mode: exact integer minimiser of sum_i w_i^2 / n_i (SPEC 1.3)
# --------------------------------------------------------------------------------------------


def _gain(w2: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Marginal gain of the (n+1)-th rollout: w^2/n - w^2/(n+1) = w^2 / (n (n+1))."""
    return w2 / (n * (n + 1.0))


def _count_gt(w2: np.ndarray, t: float, n_low: int, cap: int) -> np.ndarray:
    """Per prompt: number of units n = n_low, n_low+1, ... (at most `cap`) with gain > t.

    Gains are non-increasing in n, so that is a prefix. A closed form (n (n+1) < w^2/t) gives a
    first guess; the exact count against the float gains is then fixed up by comparisons.
    """
    if t > 0.0:
        x = (np.sqrt(1.0 + 4.0 * (w2 / t)) - 1.0) * 0.5  # n (n+1) < w^2/t  <=>  n < x
        c = np.clip(np.ceil(x) - n_low, 0, cap).astype(np.int64)
    else:
        c = np.where(w2 > 0.0, cap, 0).astype(np.int64)
    while True:
        up = np.flatnonzero(c < cap)
        up = up[_gain(w2[up], n_low + c[up]) > t]
        down = np.flatnonzero(c > 0)
        down = down[_gain(w2[down], n_low + c[down] - 1) <= t]
        if up.size == 0 and down.size == 0:
            return c
        c[up] += 1
        c[down] -= 1


def _level_fill(counts: np.ndarray, cap: int, extra: int) -> np.ndarray:
    """Add `extra` units one at a time to the prompt with the fewest units (ties: lowest index),
    never above `cap`. Vectorised: raise everyone to a level L, then one more for the first few.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if extra <= 0:
        return counts.copy()
    room = int(np.sum(cap - counts))
    if extra > room:
        raise ValueError(f"cannot place {extra} units: only {room} below the cap {cap}")

    def need(level: int) -> int:
        return int(np.sum(np.maximum(counts, min(level, cap)) - counts))

    lo, hi = int(counts.min()), cap  # need(lo) = 0 <= extra <= need(hi)
    while lo < hi:  # largest level with need(level) <= extra
        mid = (lo + hi + 1) // 2
        if need(mid) <= extra:
            lo = mid
        else:
            hi = mid - 1
    out = np.maximum(counts, lo)
    rem = extra - need(lo)
    if rem:
        at_level = np.flatnonzero(out == lo)  # lo < cap here, and rem < at_level.size
        out[at_level[:rem]] += 1
    return out


def _select_top(
    w2: np.ndarray, act: np.ndarray, c_hi: np.ndarray, c_lo: np.ndarray, n_low: int, r2: int
) -> np.ndarray:
    """Among units [c_hi_i, c_lo_i) of prompts `act`, pick the r2 first in the order
    (gain desc, n asc, index asc). Returns the number picked per entry of `act`."""
    per = c_lo - c_hi
    D = int(per.sum())
    pos = np.repeat(np.arange(act.size), per)
    starts = np.cumsum(per) - per
    n = n_low + c_hi[pos] + (np.arange(D) - starts[pos])
    g = _gain(w2[pos], n)
    if r2 >= D:
        return per.copy()
    t_star = np.partition(g, D - r2)[D - r2]  # the r2-th largest gain
    take = g > t_star
    tie = np.flatnonzero(g == t_star)
    k = r2 - int(take.sum())
    order = np.lexsort((act[pos[tie]], n[tie]))  # n asc, then prompt index asc
    take[tie[order[:k]]] = True
    return np.bincount(pos[take], minlength=act.size)


def _variance_allocation(w: np.ndarray, budget: int, n_low: int, n_high: int) -> np.ndarray:
    """Exact integer minimiser of sum_i w_i^2 / n_i (SPEC 1.3), greedy-equivalent tie breaking.

    The problem is separable and convex, so the optimum takes the R = B - N n_low largest
    marginal gains w_i^2 / (n (n+1)), n = n_low .. n_high - 1, over all prompts (each prompt's
    gains decrease in n, so the chosen units are a prefix per prompt). Instead of a heap, bisect
    on the gain threshold t with closed-form per-prompt counts (O(N) per step, shrinking to the
    prompts still undecided), then rank the few remaining candidate units exactly by
    (gain desc, n asc, index asc). Zero-gain units (zero weights) are filled level by level.
    """
    N = w.size
    cap = n_high - n_low
    R = budget - N * n_low  # units to hand out above n_low
    if R == 0 or cap == 0:
        return np.full(N, n_low, dtype=np.int64)
    w_max = float(w.max())
    ws = w / w_max if w_max > 0 else np.zeros_like(w)
    ws[ws < _TINY_RELATIVE_WEIGHT] = 0.0
    w2 = ws * ws

    c0 = _count_gt(w2, 0.0, n_low, cap)  # every unit with a positive gain
    if int(c0.sum()) <= R:  # the rest are zero-gain ties: fill level by level (n asc, index asc)
        return n_low + _level_fill(c0, cap, R - int(c0.sum()))

    # Bisection on the gain threshold t over a bracket (t_lo, t_hi] with
    # S(t_hi) <= R < S(t_lo), S(t) = number of units with gain > t. Prompts whose count is equal
    # at both ends are settled; only the still-active ones are re-evaluated.
    counts = c0.copy()
    act = np.flatnonzero(c0 > 0)
    w2a = w2[act]
    c_lo = c0[act]
    c_hi = np.zeros_like(c_lo)
    t_hi = float(np.max(_gain(w2a, np.full(act.size, n_low))))
    t_lo = 0.5 * float(np.min(_gain(w2a, n_low + c_lo - 1)))
    settled = 0  # units held by settled prompts
    limit = _SELECT_PER_PROMPT * N + _SELECT_BASE
    while int(c_lo.sum() - c_hi.sum()) > limit:
        mid = math.sqrt(t_lo) * math.sqrt(t_hi) if t_lo > 0.0 else 0.5 * t_hi
        if not t_lo < mid < t_hi:
            break
        c_mid = _count_gt(w2a, mid, n_low, cap)
        S_mid = settled + int(c_mid.sum())
        if S_mid == R:  # the units with gain > mid are exactly the top R
            counts[act] = c_mid
            return n_low + counts
        if S_mid > R:
            t_lo, c_lo = mid, c_mid
        else:
            t_hi, c_hi = mid, c_mid
        keep = c_lo > c_hi
        if not keep.all():
            done = ~keep
            counts[act[done]] = c_hi[done]
            settled += int(c_hi[done].sum())
            act, w2a, c_lo, c_hi = act[keep], w2a[keep], c_lo[keep], c_hi[keep]
    S_hi = settled + int(c_hi.sum())
    counts[act] = c_hi + _select_top(w2a, act, c_hi, c_lo, n_low, R - S_hi)
    return n_low + counts


def continuous_allocation(weights: Any, budget: float, n_low: float, n_high: float) -> np.ndarray:
    """The continuous optimum (water level) of SPEC 1.3: n_i = clip(lambda * w_i, n_low, n_high)
    with lambda such that sum_i n_i = B.

    If the positive-weight prompts all sit at n_high and budget is left, the zero-weight prompts
    share it evenly (the continuous optimum is then not unique). Returns float64 [N]; for
    diagnostics and tests, `allocate_rollouts` does not use it.
    """
    w = _check_weights(weights)
    N = w.size
    lo, hi, B = float(n_low), float(n_high), float(budget)
    if not (0 < lo <= hi and N * lo <= B <= N * hi):
        raise ValueError(f"infeasible: N={N}, budget={budget}, n_low={n_low}, n_high={n_high}")
    pos = w > 0
    n_pos = int(pos.sum())
    if n_pos == 0 or n_pos * hi + (N - n_pos) * lo <= B:
        out = np.full(N, hi)
        if n_pos < N:
            out[~pos] = (B - n_pos * hi) / (N - n_pos)
        return out

    def total(lam: float) -> float:
        return float(np.sum(np.clip(lam * w, lo, hi)))

    a, b = 0.0, float(np.max(hi / w[pos]))  # total(a) <= B <= total(b)
    for _ in range(200):
        m = 0.5 * (a + b)
        if total(m) < B:
            a = m
        else:
            b = m
        if b - a <= 1e-15 * b:
            break
    # Exact solve on the linear piece that contains the root.
    x = b * w
    low, high = x <= lo, x >= hi
    free = ~(low | high)
    if free.any():
        lam = (B - lo * low.sum() - hi * high.sum()) / float(np.sum(w[free]))
    else:
        lam = b
    return np.clip(lam * w, lo, hi)


# --------------------------------------------------------------------------------------------
# `official` mode: the authors' verl rule, reproduced (SPEC 1.3)
# --------------------------------------------------------------------------------------------


def official_priority(k: Any, G: Any) -> np.ndarray:
    """Priority rho_i of the official code (SPEC 1.3, `official` mode).

    rho_i = -1                                          if G_i < 4 (unexplored)
          = 0.01                                        if k_i / G_i >= 0.85 (easy)
          = max(P_i + 1e-6 * (1 - k_i / G_i), 0.01)     otherwise.

    Args: k, G float arrays of equal shape. Returns float64 of the same shape.
    """
    k, G = _as_stats_arrays(k, G)
    explored = G >= OFFICIAL_MIN_HISTORY
    acc = np.zeros_like(G)
    np.divide(k, G, out=acc, where=explored)
    rho = np.maximum(bernoulli_variance(k, G) + _OFFICIAL_TIEBREAK * (1.0 - acc), _OFFICIAL_FLOOR)
    rho = np.where(acc >= _OFFICIAL_EASY_ACC, _OFFICIAL_FLOOR, rho)
    return np.where(explored, rho, -1.0)


def official_allocation(k: Any, G: Any, budget: int, n_low: int, n_high: int) -> np.ndarray:
    """The official code's allocation rule (SPEC 1.3, `official` mode), without its cap overflow.

    1. Minimum: n_i = min(max(n_low, ceil(b0 - G_i)), n_high), b0 = max(n_low, 4): unexplored
       prompts are topped up to b0 observations (ceil only matters for decayed, fractional G).
       If these minimums already exceed B: ValueError.
    2. Rounds until the budget is spent: over the eligible prompts E = {rho_i > 0, n_i < n_high},
       share_i = remaining * rho_i / sum_E rho; each gets floor(share_i), the leftover units go
       one each to the largest fractional parts (ties: lower index); additions are capped at
       n_high and whatever the cap cut off is handed out in the next round.
    3. Deviation from the official code: when budget remains but no prompt is eligible (all
       positive-priority prompts at n_high), the official code overshoots n_high. Here the rest
       is spread as evenly as possible over the prompts still below n_high (necessarily
       rho <= 0, i.e. unexplored), fewest rollouts first, ties to the lower index. The check
       B <= N * n_high guarantees room, so n_high is never exceeded.

    Args:
      k, G: float arrays [N] (from `PromptStats.get`).
      budget, n_low, n_high: ints with 1 <= n_low <= n_high and N n_low <= B <= N n_high.

    Returns:
      int64 [N], n_low <= n_i <= n_high, sum == budget.
    """
    k, G = _as_stats_arrays(k, G)
    if k.ndim != 1:
        raise ValueError(f"k and G must be 1-D, got shape {k.shape}")
    bad = np.flatnonzero(~np.isfinite(G) | ~np.isfinite(k) | (G < 0) | (k < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"stats must be finite and >= 0: k[{i}] = {k[i]}, G[{i}] = {G[i]}")
    N = G.size
    B, lo, hi = check_budget(N, budget, n_low, n_high)
    rho = official_priority(k, G)
    b0 = max(lo, OFFICIAL_MIN_HISTORY)
    n = np.minimum(np.maximum(np.ceil(b0 - G), lo), hi).astype(np.int64)
    if int(n.sum()) > B:
        raise ValueError(
            f"official allocation: the minimum rollouts (max(n_low, b0 - G_i) with n_low = {lo}, "
            f"b0 = {b0}; {int(np.sum(G < OFFICIAL_MIN_HISTORY))} unexplored prompts) sum to "
            f"{int(n.sum())}, more than the budget B = {B}"
        )
    remaining = B - int(n.sum())
    while remaining > 0:
        elig = np.flatnonzero((rho > 0) & (n < hi))
        if elig.size == 0:
            return _level_fill(n, hi, remaining)
        r = rho[elig]
        share = remaining * r / r.sum()
        add = np.floor(share).astype(np.int64)
        frac = share - add
        left = remaining - int(add.sum())
        if left > 0:  # largest remainders first; stable sort puts lower indices first on ties
            add[np.argsort(-frac, kind="stable")[:left]] += 1
        elif left < 0:  # float round-off pushed the floors over: take back from the smallest
            cand = np.flatnonzero(add > 0)
            add[cand[np.argsort(frac[cand], kind="stable")[:-left]]] -= 1
        add = np.minimum(add, hi - n[elig])
        n[elig] += add
        remaining -= int(add.sum())
    return n


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


def allocate_rollouts(
    weights: Any,
    budget: int,
    n_low: int,
    n_high: int,
    *,
    mode: str = "variance",
    stats: tuple[Any, Any] | None = None,
    rollouts_per_prompt: int | None = None,
) -> np.ndarray:
    """Integer group sizes n_i for one step (SPEC 1.3).

    Args:
      weights: float [N], finite, >= 0 (from `allocation_weights`). Only its length is used in
        `official` and `uniform` modes (may be None in `official` mode if `stats` is given).
      budget: B, the total number of rollouts; N n_low <= B <= N n_high (else ValueError).
      n_low, n_high: integer bounds, 1 <= n_low <= n_high.
      mode: "variance" (default): the exact integer minimiser of sum_i w_i^2 / n_i, ties broken
          as described in the module docstring; "official": `official_allocation` (needs
          `stats`); "uniform": n_i = rollouts_per_prompt (or B // N) for all i, bounds ignored
          (plain GRPO); B must equal N n.
      stats: (k, G) float arrays [N], required for `official` mode.
      rollouts_per_prompt: n for `uniform` mode (default B // N).

    Returns:
      int64 [N] with sum exactly B.
    """
    if mode not in MODES:
        raise ValueError(f"unknown allocation mode {mode!r}; expected one of {MODES}")
    if mode == "official":
        if stats is None:
            raise ValueError("mode='official' needs stats=(k, G)")
        k, G = stats
        if weights is not None and len(weights) != np.size(G):
            raise ValueError(f"{len(weights)} weights but stats for {np.size(G)} prompts")
        return official_allocation(k, G, budget, n_low, n_high)
    w = _check_weights(weights)
    N = w.size
    if mode == "uniform":
        B = _as_int(budget, "budget")
        if rollouts_per_prompt is not None:
            n = _as_int(rollouts_per_prompt, "rollouts_per_prompt")
        else:
            n = B // N if N else 0
        if N * n != B or (N and n < 1):
            raise ValueError(
                f"uniform allocation: N * n = {N} * {n} = {N * n} must equal the budget B = {B} "
                "with n >= 1"
            )
        return np.full(N, n, dtype=np.int64)
    B, lo, hi = check_budget(N, budget, n_low, n_high)
    if N == 0:
        return np.zeros(0, dtype=np.int64)
    return _variance_allocation(w, B, lo, hi)


# --------------------------------------------------------------------------------------------
# Per-prompt history (SPEC 1.1)
# --------------------------------------------------------------------------------------------


def _id_list(ids: Any) -> list:
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
        return ids.tolist()
    if isinstance(ids, str | bytes):
        raise TypeError("ids must be a sequence of ids, not a single string")
    return list(ids)


class PromptStats:
    """Per-prompt history G_i (rollouts observed) and k_i (correct ones), SPEC 1.1.

    Keys are the dataset's stable prompt ids: Python/numpy ints (must fit int64) or strings, one
    kind per store (mixing raises TypeError). They map to dense slots in insertion order; k and G
    are float64 so that decay works. Unseen ids read as k = G = 0 (hence unexplored).

    Checkpointing: `state_dict()` returns plain numpy arrays {"ids": int64 or unicode [M],
    "k": float64 [M], "G": float64 [M]}; `PromptStats.from_state_dict` restores it exactly.
    """

    def __init__(self) -> None:
        self._slot: dict[Hashable, int] = {}
        self._ids: list = []
        self._kind: type | None = None
        self._k = np.zeros(0, dtype=np.float64)
        self._G = np.zeros(0, dtype=np.float64)

    # -- ids ---------------------------------------------------------------------------------
    def _norm(self, x: Any) -> int | str:
        if isinstance(x, bool | np.bool_):
            raise TypeError(f"prompt ids must be int or str, got bool {x!r}")
        if isinstance(x, int | np.integer):
            x, kind = int(x), int
            if not -(2**63) <= x < 2**63:
                raise ValueError(f"integer prompt id {x} does not fit in int64")
        elif isinstance(x, str | np.str_):
            x, kind = str(x), str
        else:
            raise TypeError(f"prompt ids must be int or str, got {type(x).__name__} {x!r}")
        if self._kind is not None and kind is not self._kind:
            raise TypeError(
                f"this store holds {self._kind.__name__} ids; got {kind.__name__} id {x!r}"
            )
        return x

    def _norm_unique(self, ids: Any) -> list:
        out = [self._norm(x) for x in _id_list(ids)]
        if len(set(out)) != len(out):
            seen: set = set()
            for x in out:
                if x in seen:
                    raise ValueError(f"duplicate prompt id {x!r} in one update")
                seen.add(x)
        return out

    def _grow(self, m: int) -> None:
        if m > self._k.size:
            size = max(m, 2 * self._k.size, 16)
            for name in ("_k", "_G"):
                new = np.zeros(size, dtype=np.float64)
                old = getattr(self, name)
                new[: old.size] = old
                setattr(self, name, new)

    # -- public ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, prompt_id: Any) -> bool:
        try:
            return self._norm(prompt_id) in self._slot
        except (TypeError, ValueError):
            return False

    @property
    def ids(self) -> list:
        """Known ids in insertion (slot) order."""
        return list(self._ids)

    def update(self, ids: Any, n: Any, correct: Any, decay: float = 1.0) -> None:
        """After a step: G_i <- d G_i + n_i, k_i <- d k_i + c_i for the prompts in `ids` (SPEC 1.1).

        Args:
          ids: [M] unique prompt ids of the batch (duplicates: ValueError naming the id).
          n: [M] valid rollouts per prompt (padding rows excluded), >= 0.
          correct: [M] verifier-correct rollouts per prompt, 0 <= correct <= n.
          decay: d in (0, 1]; 1.0 is the paper's cumulative count. Only the prompts in the batch
            decay (the others keep their history untouched).

        All checks run before anything is changed.
        """
        keys = self._norm_unique(ids)
        n = np.asarray(n, dtype=np.float64).reshape(-1)
        c = np.asarray(correct, dtype=np.float64).reshape(-1)
        if n.size != len(keys) or c.size != len(keys):
            raise ValueError(
                f"update got {len(keys)} ids, {n.size} counts and {c.size} correct counts"
            )
        d = float(decay)
        if not 0.0 < d <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        bad = np.flatnonzero(~np.isfinite(n) | ~np.isfinite(c) | (n < 0) | (c < 0) | (c > n))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"prompt {keys[i]!r}: need 0 <= correct <= n, got correct={c[i]:g}, n={n[i]:g}"
            )
        if keys and self._kind is None:
            self._kind = type(keys[0])
        slots = np.empty(len(keys), dtype=np.int64)
        for j, x in enumerate(keys):
            s = self._slot.get(x)
            if s is None:
                s = self._slot[x] = len(self._ids)
                self._ids.append(x)
            slots[j] = s
        self._grow(len(self._ids))
        self._G[slots] = d * self._G[slots] + n
        self._k[slots] = d * self._k[slots] + c

    def get(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(k, G) as float64 [M] for `ids` (order kept, repeats allowed); unseen ids give 0."""
        keys = [self._norm(x) for x in _id_list(ids)]
        slots = np.fromiter((self._slot.get(x, -1) for x in keys), np.int64, len(keys))
        seen = slots >= 0
        k = np.zeros(len(keys), dtype=np.float64)
        G = np.zeros(len(keys), dtype=np.float64)
        k[seen] = self._k[slots[seen]]
        G[seen] = self._G[slots[seen]]
        return k, G

    def weights(self, ids: Any, **weight_kwargs: Any) -> np.ndarray:
        """`allocation_weights(*self.get(ids), **weight_kwargs)`: float64 [M]."""
        return allocation_weights(*self.get(ids), **weight_kwargs)

    def copy(self) -> PromptStats:
        return copy.deepcopy(self)

    def state_dict(self) -> dict[str, np.ndarray]:
        """{"ids": int64 [M] (or unicode [M] for str ids), "k": float64 [M], "G": float64 [M]}."""
        m = len(self._ids)
        if self._kind is str:
            ids = np.array(self._ids, dtype=np.str_)
        else:
            ids = np.array(self._ids, dtype=np.int64).reshape(m)
        return {"ids": ids, "k": self._k[:m].copy(), "G": self._G[:m].copy()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PromptStats:
        """Inverse of `state_dict` (exact round trip). Validates shapes, values and uniqueness."""
        ids = np.asarray(state["ids"])
        k = np.asarray(state["k"], dtype=np.float64)
        G = np.asarray(state["G"], dtype=np.float64)
        if not (ids.ndim == k.ndim == G.ndim == 1 and ids.size == k.size == G.size):
            raise ValueError(f"bad PromptStats state: shapes {ids.shape}, {k.shape}, {G.shape}")
        if not (np.all(np.isfinite(k)) and np.all(np.isfinite(G))):
            raise ValueError("bad PromptStats state: non-finite k or G")
        if np.any(k < 0) or np.any(G < 0):
            raise ValueError("bad PromptStats state: negative k or G")
        self = cls()
        keys = self._norm_unique(ids)
        if keys:
            self._kind = type(keys[0])
        self._ids = keys
        self._slot = {x: i for i, x in enumerate(keys)}
        self._k, self._G = k.copy(), G.copy()
        return self

    def as_rows(self, **weight_kwargs: Any) -> list[dict[str, Any]]:
        """One dict per known prompt, slot order: id, G, k, p_hat (k/G, nan if G = 0),
        variance (P_i), weight (`allocation_weights` with `weight_kwargs`)."""
        m = len(self._ids)
        k, G = self._k[:m], self._G[:m]
        p_hat = np.full(m, np.nan)
        np.divide(k, G, out=p_hat, where=G > 0)
        var = bernoulli_variance(k, G)
        w = allocation_weights(k, G, **weight_kwargs)
        return [
            {
                "id": self._ids[i],
                "G": float(G[i]),
                "k": float(k[i]),
                "p_hat": float(p_hat[i]),
                "variance": float(var[i]),
                "weight": float(w[i]),
            }
            for i in range(m)
        ]

    def to_table(self, **weight_kwargs: Any) -> str:
        """CSV text with header `id,G,k,p_hat,variance,weight` (floats in repr precision)."""
        buf = io.StringIO()
        cols = ("id", "G", "k", "p_hat", "variance", "weight")
        buf.write(",".join(cols) + "\n")
        for row in self.as_rows(**weight_kwargs):
            buf.write(",".join(_csv_cell(row[c]) for c in cols) + "\n")
        return buf.getvalue()

    def __repr__(self) -> str:
        return f"PromptStats({len(self)} prompts)"


def _csv_cell(x: Any) -> str:
    s = repr(x) if isinstance(x, float) else str(x)
    if any(ch in s for ch in ',"\n'):
        s = '"' + s.replace('"', '""') + '"'
    return s


# --------------------------------------------------------------------------------------------
# Config-level policy: mode + refresh (SPEC 1.3)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class AllocationPolicy:
    """Turns `PromptStats` into group sizes for a batch, per the `allocation.*` config.

    refresh="step": weights come from the live stats (as of the previous step's update).
    refresh="epoch": at the start of each pass over the data the whole store is snapshotted
      (`start_epoch(stats, epoch)`, or implicitly by passing `epoch=` to `allocate` / `weights`
      with a new value, or on the first call); the snapshot is used for the whole epoch, so
      updates during the epoch do not change the weights. Prompts unseen at snapshot time read
      as k = G = 0 (unexplored weight; in `official` mode priority -1 and the b0 minimum).

    The budget is B = N * rollouts_per_prompt unless `allocate(..., budget=)` overrides it.
    """

    mode: str = "variance"
    refresh: str = "step"  # "step" | "epoch"
    n_low: int = 8
    n_high: int = 24
    rollouts_per_prompt: int = 16
    min_history: float = 4
    unexplored_weight: float | None = None
    weight_exponent: float = 1.0
    min_weight: float = 0.0
    _snapshot: PromptStats | None = dataclasses.field(default=None, init=False, repr=False)
    _epoch: int | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown allocation mode {self.mode!r}; expected one of {MODES}")
        if self.refresh not in REFRESH:
            raise ValueError(f"unknown refresh {self.refresh!r}; expected one of {REFRESH}")

    @classmethod
    def from_config(cls, config: Any) -> AllocationPolicy:
        """From the top-level ConfigDict (fields `rollouts_per_prompt`, `allocation.*`)."""
        a = config.allocation
        return cls(
            mode=a.mode,
            refresh=a.refresh,
            n_low=a.n_low,
            n_high=a.n_high,
            rollouts_per_prompt=config.rollouts_per_prompt,
            min_history=a.min_history,
            unexplored_weight=a.unexplored_weight,
            weight_exponent=a.weight_exponent,
            min_weight=a.min_weight,
        )

    @property
    def epoch(self) -> int | None:
        """Epoch of the current snapshot (None before the first one)."""
        return self._epoch

    def start_epoch(self, stats: PromptStats, epoch: int | None = None) -> None:
        """Snapshot `stats` for the epoch (refresh="epoch"; harmless for "step")."""
        self._snapshot = stats.copy()
        self._epoch = (
            epoch if epoch is not None else (0 if self._epoch is None else self._epoch + 1)
        )

    def _source(self, stats: PromptStats, epoch: int | None) -> PromptStats:
        if self.refresh == "step":
            return stats
        if self._snapshot is None or (epoch is not None and epoch != self._epoch):
            self.start_epoch(stats, epoch)
        return self._snapshot

    def weight_kwargs(self) -> dict[str, Any]:
        return {
            "min_history": self.min_history,
            "unexplored_weight": self.unexplored_weight,
            "weight_exponent": self.weight_exponent,
            "min_weight": self.min_weight,
        }

    def weights(self, stats: PromptStats, ids: Sequence | np.ndarray, epoch: int | None = None):
        """float64 [N] weights for `ids` from the live stats or the epoch snapshot."""
        return self._source(stats, epoch).weights(ids, **self.weight_kwargs())

    def allocate(
        self,
        stats: PromptStats,
        ids: Iterable | np.ndarray,
        *,
        epoch: int | None = None,
        budget: int | None = None,
    ) -> np.ndarray:
        """int64 [N] group sizes for the batch `ids` (sum = budget, default N * n)."""
        ids = _id_list(ids)
        N = len(ids)
        B = N * self.rollouts_per_prompt if budget is None else budget
        src = self._source(stats, epoch)
        if self.mode == "official":
            return official_allocation(*src.get(ids), B, self.n_low, self.n_high)
        w = src.weights(ids, **self.weight_kwargs())
        return allocate_rollouts(
            w,
            B,
            self.n_low,
            self.n_high,
            mode=self.mode,
            rollouts_per_prompt=self.rollouts_per_prompt,
        )

    def state_dict(self) -> dict[str, Any]:
        """{"epoch": int (-1 = none), "snapshot": PromptStats state or {}} for checkpoints."""
        return {
            "epoch": np.int64(-1 if self._epoch is None else self._epoch),
            "snapshot": {} if self._snapshot is None else self._snapshot.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        e = int(state["epoch"])
        self._epoch = None if e < 0 else e
        snap = state["snapshot"]
        self._snapshot = PromptStats.from_state_dict(snap) if len(snap) else None
