"""The baselines DynaMO is compared against (SPEC section 6), as options of the same loss.  [jit]

Each baseline is a small change to GRPO's token loss or advantages, selected by config fields
(`loss.token_selection`, `advantage.entropy_shaping_k`, `advantage.estimator`, ...), and each has
one preset in `PRESETS` (apply with `apply_preset(config, name)`, or run
`configs/arith_baselines.py:<name>`). The formulas and their sources are written out in
docs/BASELINES.md; the functions below are what the train step calls inside the loss, per
micro-batch, under `stop_gradient` (a selection or a shaped advantage carries no gradient).

Shapes: token arrays are [rows, T]; `mask` is the response mask (1 on valid response tokens).
Token selections are taken over the tokens of one call (one gradient micro-batch, across all
devices), as modulation's default scope is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

TOKEN_SELECTIONS = ("none", "fork_tokens", "clip_cov", "kl_cov")


def _f32(x: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))


def _token_advantages(advantages: jax.Array, like: jax.Array) -> jax.Array:
    a = _f32(advantages)
    if a.ndim == like.ndim - 1:
        a = a[..., None]
    return jnp.broadcast_to(a, like.shape)


def _top_count(scores: jax.Array, eligible: jax.Array, count: jax.Array) -> jax.Array:
    """Boolean mask of the `count` eligible entries with the largest scores (ties: lower flat
    index first). `count` may be traced; fewer are chosen when fewer are eligible."""
    flat = jnp.where(eligible, scores, -jnp.inf).reshape(-1)
    order = jnp.argsort(-flat, stable=True)  # eligible first, largest score first
    rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return eligible & (rank.reshape(scores.shape) < count)


def fork_token_mask(entropy: jax.Array, mask: jax.Array, fraction: float = 0.2) -> jax.Array:
    """Fork tokens (Wang et al. 2025): 1 on the ceil(fraction * n) highest-entropy valid tokens
    of the scope (n = valid tokens), 0 elsewhere. Only these tokens carry policy gradient."""
    valid = jnp.asarray(mask) > 0
    n = jnp.sum(valid)
    # float32 rounds some exact products up (0.3 * 50 = 15.000001 -> ceil 16): a relative 1e-6
    # below the product before ceil (floor: above) gives the exact integer count.
    count = jnp.ceil(fraction * n.astype(jnp.float32) * (1.0 - 1e-6)).astype(jnp.int32)
    return _top_count(_f32(entropy), valid, count).astype(jnp.float32)


def entropy_shaped_advantages(
    advantages: jax.Array, entropy: jax.Array, k: float = 0.4, kappa: float = 2.0
) -> jax.Array:
    """Entropy advantages (Cheng et al. 2025): A + min(k * H, |A| / kappa), H detached.

    The bonus is never larger than |A| / kappa, so it cannot flip the sign of a negative
    advantage; a zero advantage (zero-variance group) stays zero. Returns [rows, T] float32.
    """
    h = _f32(entropy)
    a = _token_advantages(advantages, h)
    return a + jnp.minimum(k * h, jnp.abs(a) / kappa)


def token_covariance(logp: jax.Array, advantages: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token centred product (logp - mean logp) * (A - mean A) over the valid tokens of the
    scope (Cui et al. 2025, the covariance that drives the entropy change); 0 on padding."""
    m = jnp.asarray(mask, jnp.float32)
    lp = _f32(logp)
    a = _token_advantages(advantages, lp)
    n = jnp.maximum(jnp.sum(m), 1.0)
    lp_mean = jnp.sum(lp * m) / n
    a_mean = jnp.sum(a * m) / n
    return (lp - lp_mean) * (a - a_mean) * m


def _selection_count(mask: jax.Array, fraction: float) -> jax.Array:
    """max(floor(fraction * n), 1) for n valid tokens (0 when there are none)."""
    n = jnp.sum(jnp.asarray(mask) > 0)
    product = fraction * n.astype(jnp.float32) * (1.0 + 1e-6)  # see fork_token_mask
    count = jnp.maximum(jnp.floor(product).astype(jnp.int32), 1)
    return jnp.where(n > 0, count, 0)


def clip_cov_mask(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    *,
    fraction: float = 2e-4,
    cov_low: float = 1.0,
    cov_high: float = 5.0,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> jax.Array:
    """Clip-Cov (Cui et al. 2025): the tokens whose gradient is detached (1 = detached).

    Among valid tokens not already clipped by the PPO clip and with covariance in
    (cov_low, cov_high), max(floor(fraction * n), 1) are drawn uniformly at random (fewer if
    fewer qualify).
    """
    m = jnp.asarray(mask) > 0
    lp, old = _f32(logp), _f32(old_logp)
    a = _token_advantages(advantages, lp)
    ratio = jnp.exp(jnp.clip(lp - old, -20.0, 20.0))
    clipped_by_origin = -a * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) > -a * ratio
    cov = token_covariance(lp, a, m)
    eligible = m & ~clipped_by_origin & (cov > cov_low) & (cov < cov_high)
    scores = jax.random.uniform(key, lp.shape)
    return _top_count(scores, eligible, _selection_count(m, fraction)).astype(jnp.float32)


def kl_cov_mask(
    logp: jax.Array, advantages: jax.Array, mask: jax.Array, *, fraction: float = 2e-4
) -> jax.Array:
    """KL-Cov (Cui et al. 2025): 1 on the max(floor(fraction * n), 1) valid tokens with the
    largest covariance; the loss adds coef * |logp - old_logp| on them."""
    m = jnp.asarray(mask) > 0
    cov = token_covariance(logp, advantages, m)
    return _top_count(cov, m, _selection_count(m, fraction)).astype(jnp.float32)


def w_reinforce_advantages(
    rewards: jax.Array, valid: jax.Array, positive_weight: float = 0.1
) -> jax.Array:
    """W-REINFORCE (Zhu et al. 2025): no baseline; a positive reward is down-weighted by
    `positive_weight` (lambda), a negative one is kept: A = lambda * R if R > 0 else R."""
    r = jnp.asarray(rewards, jnp.float32)
    return jnp.where(valid, jnp.where(r > 0, positive_weight * r, r), 0.0)


# --- presets -------------------------------------------------------------------------------

# Every baseline turns DynaMO's two mechanisms off (uniform allocation, no modulation) and
# changes one thing. GRPO keeps the symmetric clip eps_high = 0.2 (SPEC 6); the others start from
# Clip-Higher (eps_high = 0.28, DynaMO's own setting) so each differs from DynaMO's base in its
# own mechanism only. Dr.GRPO is GRPO with its two fixes (no std division, constant
# normaliser).
_OFF = {
    "allocation.mode": "uniform",
    "modulation.comp": False,
    "modulation.stab": False,
}
PRESETS: dict[str, dict[str, Any]] = {
    "dynamo": {},
    "grpo": {**_OFF, "loss.eps_high": 0.2},
    "clip_higher": {**_OFF, "loss.eps_high": 0.28},
    "entropy_loss": {**_OFF, "loss.eps_high": 0.28, "loss.entropy_coef": 1e-3},
    "fork_tokens": {**_OFF, "loss.eps_high": 0.28, "loss.token_selection": "fork_tokens"},
    "entropy_advantages": {**_OFF, "loss.eps_high": 0.28, "advantage.entropy_shaping_k": 0.4},
    # Clip-Cov and KL-Cov as in the authors' 7B recipes (Entropy-Mechanism-of-RL, verl
    # recipe/entropy): Clip-Cov turns the PPO ratio clip off (clip ratios 1 / 1) and detaches
    # 2e-4 of the tokens; KL-Cov penalises 2e-3 of them (2e-4 is their 32B value).
    "clip_cov": {
        **_OFF,
        "loss.eps_low": 1.0,
        "loss.eps_high": 1.0,
        "loss.token_selection": "clip_cov",
        "loss.cov_fraction": 2e-4,
    },
    "kl_cov": {
        **_OFF,
        "loss.eps_high": 0.28,
        "loss.token_selection": "kl_cov",
        "loss.cov_fraction": 2e-3,
    },
    "w_reinforce": {**_OFF, "loss.eps_high": 0.28, "advantage.estimator": "w_reinforce"},
    "dr_grpo": {
        **_OFF,
        "loss.eps_high": 0.2,
        "advantage.estimator": "dr_grpo",
        "loss.loss_agg": "seq_mean_token_sum_norm",
    },
}


def apply_preset(config: Any, name: str) -> Any:
    """Set the fields of baseline `name` on `config` (in place; also returned)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown baseline preset {name!r}; choose one of {sorted(PRESETS)}.")
    for path, value in PRESETS[name].items():
        section, field = path.split(".")
        config[section][field] = value
    return config
