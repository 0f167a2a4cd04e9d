"""Gradient-aware advantage modulation (SPEC section 2).  [jit]

Per token, DynaMO rescales the advantage by two factors, both computed in float32 under
`stop_gradient`:

- `beta_comp` (SPEC 2.1) boosts positive-advantage tokens the policy is already confident about
  (low entropy), whose gradient the softmax attenuates;
- `beta_stab` (SPEC 2.3) damps the tokens whose update would move the policy entropy most, using
  the first-order entropy-change estimate of SPEC 2.2 (`entropy_change`).

The *scope* (SPEC 2.4) over which H_max, H_min and max Xi are taken is the set of tokens passed
in one call: call `modulate_advantages` on one micro-batch for scope `micro_batch`. Inside `jit`
with rows sharded over devices those reductions are global, so the result does not depend on the
device count. For scope `mini_batch`, compute `scope_statistics` over the whole optimiser update
first (the parameters do not change within it) and pass them in as `scope`.

Shapes: `[rows, T]` token arrays; `mask` is the response mask (1 on valid response tokens).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dynamo_jax import checks

EXPECTATIONS = ("sequence", "vocab")
_LOG_RATIO_CLIP = 20.0  # SPEC 2: r = exp(clip(logp - old_logp, -20, 20))


class ScopeStats(NamedTuple):
    """Reductions over the normalisation scope (scalars, float32)."""

    h_max: jax.Array  # max entropy over valid tokens
    h_min: jax.Array  # min entropy over valid tokens
    xi_max: jax.Array  # max |estimated entropy change| over valid tokens


def _f32(x: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))


def _mask(mask: jax.Array) -> jax.Array:
    """A response mask as float32 0/1: valid where > 0, never a weight (see checks.zero_one)."""
    return (jnp.asarray(mask) > 0).astype(jnp.float32)


def _broadcast_advantages(advantages: jax.Array, like: jax.Array) -> jax.Array:
    """Row advantages [rows] -> [rows, 1]: broadcasting, not a materialised [rows, T] copy."""
    a = _f32(advantages)
    if a.ndim == like.ndim - 1:
        a = a[..., None]
    return a


def importance_ratio(logp: jax.Array, old_logp: jax.Array) -> jax.Array:
    """r = exp(clip(logp - old_logp, -20, 20)) (SPEC 2): [rows, T] inputs of any float dtype ->
    [rows, T] float32."""
    return jnp.exp(
        jnp.clip(
            jnp.asarray(logp, jnp.float32) - jnp.asarray(old_logp, jnp.float32),
            -_LOG_RATIO_CLIP,
            _LOG_RATIO_CLIP,
        )
    )


def _check_shapes(fn: str, advantages: jax.Array, mask: jax.Array, **arrays: jax.Array) -> None:
    """Every array shaped like `mask` ([rows, T]); advantages per row or per token."""
    shape = checks.same_shape(fn, "mask", dict(mask=mask, **arrays))
    checks.row_or_token_shape(fn, "advantages", advantages, shape)
    checks.zero_one(fn, "mask", mask)


def _masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.max(jnp.where(mask > 0, x, -jnp.inf), initial=-jnp.inf)


def _masked_min(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.min(jnp.where(mask > 0, x, jnp.inf), initial=jnp.inf)


def beta_comp(
    advantages: jax.Array,
    entropy: jax.Array,
    mask: jax.Array,
    alpha: float = 0.2,
    h_max: jax.Array | None = None,
    h_min: jax.Array | None = None,
) -> jax.Array:
    """Compensation factor (SPEC 2.1).

    beta_comp = 1 + alpha * (H_max - H) / (H_max - H_min + 1e-8) where A > 0, 1 elsewhere,
    with H_max / H_min the masked max / min of H over the scope (the inputs unless given).

    Args:
      advantages: [rows] or [rows, T]; entropy, mask: [rows, T].
    Returns:
      [rows, T] float32, 1 on padding.
    """
    _check_shapes("beta_comp", advantages, mask, entropy=entropy)
    h = _f32(entropy)
    a = _broadcast_advantages(advantages, h)
    m = _mask(mask)
    h_max = _masked_max(h, m) if h_max is None else _f32(h_max)
    h_min = _masked_min(h, m) if h_min is None else _f32(h_min)
    # An empty scope leaves h_max = -inf, h_min = +inf: no boost (a given scope that holds none
    # of these tokens must not turn them into -inf).
    finite = jnp.isfinite(h_max) & jnp.isfinite(h_min)
    span = jnp.where(finite, h_max - h_min, 0.0)
    rel = jnp.where((m > 0) & finite, (h_max - h) / (span + 1e-8), 0.0)
    return jnp.where((a > 0) & (m > 0), 1.0 + alpha * rel, 1.0)


def vocab_expectation(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """E_{a~pi}[pi_a Lambda_a] = sum_a pi_a^2 (log pi_a + H) at each position (SPEC 2.2 `vocab`).

    Args:
      logits: [..., vocab]. Returns [...] float32 (no gradient).
    For a [rows, T, vocab] batch prefer `losses.token_logprobs_and_entropy(...,
    with_vocab_expectation=True)`, which computes it in chunks.
    """
    z = _f32(logits) / temperature
    logp = jax.nn.log_softmax(z, axis=-1)
    p = jnp.exp(logp)
    h = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1, keepdims=True)  # -inf logits: 0
    return jnp.sum(jnp.where(p > 0, p * p * (logp + h), 0.0), axis=-1)


def entropy_change(
    advantages: jax.Array,
    logp: jax.Array,
    old_logp: jax.Array,
    entropy: jax.Array,
    mask: jax.Array,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    expectation: str = "sequence",
    expected_pi_lambda: jax.Array | None = None,
) -> jax.Array:
    """First-order estimate of the entropy change each token's update causes (SPEC 2.2).

      xi = I_clip * r * A,  I_clip = [A>0][r <= 1+eps_high] + [A<0][r >= 1-eps_low]
      Lambda = logp + H,    dH = -xi * (pi * Lambda - E[pi * Lambda])

    `expectation="sequence"`: E is the masked mean of pi * Lambda over the row's valid tokens
    (the official code). `"vocab"`: E = sum_a pi_a^2 (log pi_a + H) at the same position, the
    exact first-order term; pass it as `expected_pi_lambda` ([rows, T], from
    `vocab_expectation` or `token_logprobs_and_entropy(..., with_vocab_expectation=True)`).

    Returns:
      dH: [rows, T] float32, 0 on padding.
    """
    if expectation not in EXPECTATIONS:
        raise ValueError(f"modulation.expectation {expectation!r}; choose one of {EXPECTATIONS}.")
    _check_shapes(
        "entropy_change",
        advantages,
        mask,
        logp=logp,
        old_logp=old_logp,
        entropy=entropy,
        expected_pi_lambda=expected_pi_lambda,
    )
    lp, h, m = _f32(logp), _f32(entropy), _mask(mask)
    a = _broadcast_advantages(advantages, lp)
    r = jax.lax.stop_gradient(importance_ratio(lp, old_logp))
    in_clip = jnp.where(a > 0, r <= 1.0 + eps_high, (a < 0) & (r >= 1.0 - eps_low))
    xi = jnp.where(in_clip, r * a, 0.0)
    pi_lambda = jnp.exp(lp) * (lp + h)
    if expectation == "sequence":
        row_count = jnp.sum(m, axis=-1, keepdims=True)
        # where, not a product with the mask: a NaN or inf at a padding position (an
        # out-of-vocabulary pad id inside jit gives a NaN log-prob) must not reach the row mean.
        total = jnp.sum(jnp.where(m > 0, pi_lambda, 0.0), axis=-1, keepdims=True)
        expect = total / jnp.maximum(row_count, 1.0)
    else:
        if expected_pi_lambda is None:
            raise ValueError(
                "expectation='vocab' needs expected_pi_lambda (sum_a pi_a^2 (log pi_a + H) per "
                "token); compute it with token_logprobs_and_entropy(..., "
                "with_vocab_expectation=True) or modulation.vocab_expectation(logits)."
            )
        expect = _f32(expected_pi_lambda)
    return jnp.where(m > 0, -xi * (pi_lambda - expect), 0.0)


def beta_stab(
    xi_abs: jax.Array,
    mask: jax.Array,
    lambda_min: float = 0.6,
    gamma: float = 50.0,
    tau: float = 0.99,
    xi_max: jax.Array | None = None,
) -> jax.Array:
    """Stabilisation factor (SPEC 2.3).

      x = Xi / (max Xi + 1e-8)
      beta_stab = lambda_min + (1 - lambda_min) / (1 + exp(gamma (x - tau)))

    Args:
      xi_abs: [rows, T] Xi = |dH|; mask: [rows, T]; xi_max: the scope's max Xi if not the input's.
    Returns:
      [rows, T] float32, 1 on padding.
    """
    checks.same_shape("beta_stab", "mask", dict(mask=mask, xi_abs=xi_abs))
    checks.zero_one("beta_stab", "mask", mask)
    xi, m = _f32(xi_abs), _mask(mask)
    xi = jnp.where(m > 0, xi, 0.0)
    xi_max = jnp.max(xi, initial=0.0) if xi_max is None else _f32(xi_max)
    x = xi / (xi_max + 1e-8)
    beta = lambda_min + (1.0 - lambda_min) * jax.nn.sigmoid(-gamma * (x - tau))
    return jnp.where(m > 0, beta, 1.0)


def scope_statistics(
    advantages: jax.Array,
    logp: jax.Array,
    old_logp: jax.Array,
    entropy: jax.Array,
    mask: jax.Array,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    expectation: str = "sequence",
    expected_pi_lambda: jax.Array | None = None,
) -> ScopeStats:
    """H_max, H_min and max Xi over the given tokens: the normalisation scope of SPEC 2.4.

    Arguments as in `modulate_advantages` (advantages [rows] or [rows, T]; logp, old_logp,
    entropy, mask [rows, T]). For `mini_batch` scope, compute this per micro-batch, merge with
    `combine_scope_statistics` and pass the result to `modulate_advantages(scope=...)`.
    An empty token set gives the identities of the merge (H_max = -inf, H_min = +inf,
    max Xi = 0), so merging it changes nothing; `modulate_advantages` never turns them into
    NaN (an all-padding batch gets advantages 0).

    Returns:
      ScopeStats of float32 scalars.
    """
    m = _mask(mask)
    h = _f32(entropy)
    xi = jnp.abs(
        entropy_change(
            advantages,
            logp,
            old_logp,
            entropy,
            mask,
            eps_low,
            eps_high,
            expectation,
            expected_pi_lambda,
        )
    )
    return ScopeStats(
        h_max=_masked_max(h, m), h_min=_masked_min(h, m), xi_max=jnp.max(xi, initial=0.0)
    )


def combine_scope_statistics(a: ScopeStats, b: ScopeStats) -> ScopeStats:
    """Merge the statistics of two disjoint token sets (e.g. micro-batches of one update):
    elementwise max / min / max of the float32 scalars, so merging is associative and the
    result does not depend on how the tokens were split."""
    return ScopeStats(
        h_max=jnp.maximum(a.h_max, b.h_max),
        h_min=jnp.minimum(a.h_min, b.h_min),
        xi_max=jnp.maximum(a.xi_max, b.xi_max),
    )


def _modulate_advantages(
    advantages: jax.Array,
    entropy: jax.Array,
    logp: jax.Array,
    old_logp: jax.Array,
    mask: jax.Array,
    *,
    comp: bool = True,
    stab: bool = True,
    alpha: float = 0.2,
    lambda_min: float = 0.6,
    gamma: float = 50.0,
    tau: float = 0.99,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    expectation: str = "sequence",
    expected_pi_lambda: jax.Array | None = None,
    scope: ScopeStats | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A_final = A * beta_comp * beta_stab (SPEC 2.4), with logging statistics.

    Args:
      advantages: [rows] or [rows, T] advantages A (row advantages are broadcast to tokens).
      entropy: [rows, T] full-vocabulary entropy of the current policy at the sampling temperature.
      logp, old_logp: [rows, T] log-probs of the sampled tokens, current and behaviour policy.
      mask: [rows, T] response mask, 0 or 1 (0 on prompt padding / after EOS / padding rows);
        not a weight: another value is an error (read as valid where > 0 inside jit).
      comp, stab: switch each factor (both off = plain GRPO advantages).
      alpha: compensation strength; lambda_min, gamma, tau: stabilisation sigmoid.
      eps_low, eps_high: the clip range used by I_clip (the same as the loss's).
      expectation, expected_pi_lambda: see `entropy_change`.
      scope: reductions of a larger scope (`mini_batch`); None = over these tokens.

    Returns:
      final_advantages: [rows, T] float32 without gradient, 0 on padding.
      aux: scalars: `beta_comp_pos_mean` (mean beta_comp on A>0 tokens), `beta_stab_mean`,
        `damped_frac` (share of valid tokens with beta_stab < 0.99), `xi_mean`, `xi_max`,
        `h_max`, `h_min`. Empty sets give 0, never NaN. To average over several calls (micro-
        batches), do not average those means: add up the sums and counts also returned,
        `beta_comp_pos_sum` / `pos_tokens`, `beta_stab_sum`, `damped_tokens` and `xi_sum` /
        `valid_tokens`, and divide once (what `TrainStep` logs).
    """
    _check_shapes(
        "modulate_advantages",
        advantages,
        mask,
        entropy=entropy,
        logp=logp,
        old_logp=old_logp,
        expected_pi_lambda=expected_pi_lambda,
    )
    m = _mask(mask)
    a = _broadcast_advantages(advantages, m)
    h = _f32(entropy)
    valid = m > 0
    xi = jnp.abs(
        entropy_change(a, logp, old_logp, h, m, eps_low, eps_high, expectation, expected_pi_lambda)
    )
    if scope is None:
        scope = ScopeStats(_masked_max(h, m), _masked_min(h, m), jnp.max(xi, initial=0.0))

    final = a
    bc = bs = jnp.ones_like(m)
    if comp:
        bc = beta_comp(a, h, m, alpha, scope.h_max, scope.h_min)
        final = final * bc
    if stab:
        bs = beta_stab(xi, m, lambda_min, gamma, tau, scope.xi_max)
        final = final * bs
    final = jnp.where(valid, final, 0.0)

    pos = valid & (a > 0)
    sums = {
        "beta_comp_pos_sum": jnp.sum(jnp.where(pos, bc, 0.0)),
        "pos_tokens": jnp.sum(pos).astype(jnp.float32),
        "beta_stab_sum": jnp.sum(jnp.where(valid, bs, 0.0)),
        "damped_tokens": jnp.sum(valid & (bs < 0.99)).astype(jnp.float32),
        "xi_sum": jnp.sum(xi),
        "valid_tokens": jnp.sum(valid).astype(jnp.float32),
    }
    n_valid = jnp.maximum(sums["valid_tokens"], 1.0)
    aux = {
        **sums,
        "beta_comp_pos_mean": sums["beta_comp_pos_sum"] / jnp.maximum(sums["pos_tokens"], 1.0),
        "beta_stab_mean": sums["beta_stab_sum"] / n_valid,
        "damped_frac": sums["damped_tokens"] / n_valid,
        "xi_mean": sums["xi_sum"] / n_valid,
        "xi_max": jnp.max(xi, initial=0.0),
        "h_max": jnp.where(jnp.isfinite(scope.h_max), scope.h_max, 0.0),
        "h_min": jnp.where(jnp.isfinite(scope.h_min), scope.h_min, 0.0),
    }
    return jax.lax.stop_gradient(final), aux


_modulate_advantages_jit = jax.jit(
    _modulate_advantages, static_argnames=("comp", "stab", "expectation")
)


@functools.wraps(_modulate_advantages)
def modulate_advantages(*args, **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
    # The mask's values are checked here, where they can be read; inside jit they are tracers.
    mask = kwargs["mask"] if "mask" in kwargs else args[4] if len(args) > 4 else None
    checks.zero_one("modulate_advantages", "mask", mask)
    return _modulate_advantages_jit(*args, **kwargs)


modulate_advantages.__name__ = modulate_advantages.__qualname__ = "modulate_advantages"
