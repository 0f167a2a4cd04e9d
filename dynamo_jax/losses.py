"""Token log-probs and entropy (chunked), and the policy loss (SPEC section 4).  [jit]

`token_logprobs_and_entropy` turns hidden states and the LM-head matrix into per-token log-probs
of the sampled tokens and full-vocabulary entropies at a temperature, a chunk of positions at a
time: the float32 `[rows, chunk, vocab]` logits of one chunk are the largest array that exists,
forward and backward (the hand-written backward recomputes each chunk's logits from its hidden
states; with a single chunk it keeps them).

`policy_loss` returns `(loss_sum, count, aux_sums)` rather than a mean, so that summing the pairs
of several micro-batches and dividing once gives exactly the full-batch value for every
aggregation mode ("never an average of averages").
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax import checks
from dynamo_jax.modulation import importance_ratio

LOSS_AGGREGATIONS = (
    "token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_mean",
    "seq_mean_token_sum_norm",
)
KL_ESTIMATORS = ("k1", "k2", "k3")


class TokenStats(NamedTuple):
    """Per-token quantities, each [rows, T] float32."""

    logp: jax.Array  # log pi(y_t), differentiable
    entropy: jax.Array  # full-vocabulary entropy, differentiable
    expected_pi_lambda: jax.Array | None  # sum_a pi_a^2 (log pi_a + H) (no gradient) or None


def _softmax_stats(z, t, with_vocab):
    """z [N, V] float32 scaled logits, t [N, 1] int32 targets -> (logp [N], entropy [N],
    E_vocab [N] (zeros unless with_vocab), logz [N, 1]). E_vocab = sum_a p_a^2 (log p_a + H)."""
    logz = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    logp_all = z - logz
    p = jnp.exp(logp_all)
    # p log p -> 0 as p -> 0: a logit of -inf (a model that masks ids so) has p = 0 and
    # log p = -inf, whose product is NaN.
    entropy = -jnp.sum(jnp.where(p > 0, p * logp_all, 0.0), axis=-1)
    logp = jnp.take_along_axis(logp_all, t, axis=-1)[:, 0]
    if with_vocab:
        e_vocab = jnp.sum(jnp.where(p > 0, p * p * (logp_all + entropy[:, None]), 0.0), axis=-1)
    else:
        e_vocab = jnp.zeros_like(entropy)
    return logp, entropy, e_vocab, logz


def _softmax_stats_cotangent(z, logz, entropy, onehot, g_logp, g_entropy, temperature):
    """Cotangents of (logits, temperature) from those of (logp, entropy), z = logits / T:
      d logp_y / dz = onehot(y) - p,  d H / dz = -p (log p + H),  d z / dT = -z / T.
    g_logp, g_entropy: [N, 1]; z: [N, V] float32; temperature: a scalar array. One elementwise
    pass from the saved log-normaliser and entropy (autodiff of the forward instead builds a
    scatter for the target gather and re-reduces the softmax)."""
    logp_all = z - logz
    p = jnp.exp(logp_all)
    p_lambda = jnp.where(p > 0, p * (logp_all + entropy[..., None]), 0.0)  # 0 where p = 0
    g_z = g_logp * (onehot - p) - g_entropy * p_lambda
    g_temperature = -jnp.sum(g_z * z) / temperature  # unused (and removed by jit) unless traced
    return g_z / temperature, g_temperature.astype(temperature.dtype).reshape(temperature.shape)


def _flat_targets(targets):
    return targets.reshape(-1, 1).astype(jnp.int32)


def _targets_cotangent(targets):
    return np.zeros(targets.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _logits_stats(logits, targets, temperature, with_vocab, vocab_limit=None):
    """(logp, entropy, E_vocab or zeros) of one chunk of logits [..., V] (any dtype), float32,
    with the hand-written gradient of `_softmax_stats_cotangent`."""
    return _logits_stats_fwd(logits, targets, temperature, with_vocab, vocab_limit)[0]


def _scaled_logits(logits, temperature, vocab_limit):
    z = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32) / temperature
    return _limit_vocab(z, vocab_limit)


def _logits_stats_fwd(logits, targets, temperature, with_vocab, vocab_limit):
    z = _scaled_logits(logits, temperature, vocab_limit)
    logp, entropy, e_vocab, logz = _softmax_stats(z, _flat_targets(targets), with_vocab)
    outs = tuple(o.reshape(targets.shape) for o in (logp, entropy, e_vocab))
    return outs, (logits, targets, logz, entropy, temperature)


def _logits_stats_bwd(with_vocab, vocab_limit, residuals, cotangents):
    logits, targets, logz, entropy, temperature = residuals
    g_logp, g_entropy, _ = (c.reshape(-1, 1) for c in cotangents)  # E_vocab: no gradient
    z = _scaled_logits(logits, temperature, vocab_limit)
    onehot = _flat_targets(targets) == jnp.arange(z.shape[-1], dtype=jnp.int32)
    d_logits, d_temperature = _softmax_stats_cotangent(
        z, logz, entropy, onehot, g_logp, g_entropy, temperature
    )
    d_logits = d_logits.reshape(logits.shape).astype(logits.dtype)
    return d_logits, _targets_cotangent(targets), d_temperature


_logits_stats.defvjp(_logits_stats_fwd, _logits_stats_bwd)


def _chunked(
    chunk_fn,
    xs: jax.Array,
    targets: jax.Array,
    chunk_size: int,
    with_vocab_expectation: bool,
) -> TokenStats:
    """Map chunk_fn(x [rows, C, ...], targets [rows, C], single_chunk) -> (logp, entropy[, E])
    over chunks of the length axis of xs [rows, T, ...]. chunk_fn's own gradient keeps no
    [rows, C, V] float32 array between forward and backward, so no jax.checkpoint is needed."""
    rows, length = targets.shape
    chunk = max(1, min(chunk_size, length))
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        xs = jnp.pad(xs, [(0, 0), (0, pad)] + [(0, 0)] * (xs.ndim - 2))
        targets = jnp.pad(targets, [(0, 0), (0, pad)])
    # [n_chunks, rows, C, ...]: the row axis (the sharded one) stays in place within a chunk.
    xs_c = jnp.moveaxis(xs.reshape(rows, n_chunks, chunk, *xs.shape[2:]), 1, 0)
    t_c = jnp.moveaxis(targets.reshape(rows, n_chunks, chunk), 1, 0)
    if n_chunks == 1:
        outs = [o[None] for o in chunk_fn(xs_c[0], t_c[0], True)]
    else:
        outs = jax.lax.map(lambda args: chunk_fn(*args, single_chunk=False), (xs_c, t_c))
    outs = [jnp.moveaxis(o, 0, 1).reshape(rows, n_chunks * chunk)[:, :length] for o in outs]
    return TokenStats(outs[0], outs[1], outs[2] if with_vocab_expectation else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _head_stats(hidden, lm_head, targets, temperature, with_vocab, save_logits, vocab_limit=None):
    """(logp, entropy, E_vocab or zeros) of one chunk, hidden [rows, C, D] @ lm_head [D, V].

    Written with its own gradient: the backward recomputes the chunk's logits from the saved
    hidden states (so only one chunk's [rows, C, V] exists at a time, without jax.checkpoint;
    with one chunk, `save_logits` keeps them instead), forms dz in one elementwise pass from the
    saved log-normaliser and entropy, and runs the two gradient matmuls as plain 2-D products.
    Autodiff of the same forward made XLA:CPU write dz transposed inside the softmax fusion:
    4.3x slower at a 512 vocabulary and 1.9x at Qwen2.5-0.5B's (benchmarks/bench_head.py).
    """
    return _head_stats_fwd(
        hidden, lm_head, targets, temperature, with_vocab, save_logits, vocab_limit
    )[0]


# The scaled logit of an id at or past `vocab_limit`: finite, so that p = 0 and p * log p = 0
# in the forward and the cotangent (with -inf, 0 * -inf would be NaN).
_MASKED_LOGIT = -1e30


def _limit_vocab(z, vocab_limit):
    """Scaled logits [N, V] with the ids at or past `vocab_limit` (static) given no mass."""
    if vocab_limit is None or vocab_limit >= z.shape[-1]:
        return z
    return jnp.where(jnp.arange(z.shape[-1]) < vocab_limit, z, _MASKED_LOGIT)


def _head_logits(hidden, lm_head, temperature, vocab_limit=None):
    h2 = hidden.reshape(-1, hidden.shape[-1])
    z = jnp.dot(h2, lm_head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return _limit_vocab(z / temperature, vocab_limit)  # [rows * C, V] float32


def _head_stats_fwd(hidden, lm_head, targets, temperature, with_vocab, save_logits, vocab_limit):
    z = _head_logits(hidden, lm_head, temperature, vocab_limit)
    logp, entropy, e_vocab, logz = _softmax_stats(z, _flat_targets(targets), with_vocab)
    outs = tuple(o.reshape(targets.shape) for o in (logp, entropy, e_vocab))
    residuals = (hidden, lm_head, targets, logz, entropy, z if save_logits else None, temperature)
    return outs, residuals


def _head_stats_bwd(with_vocab, save_logits, vocab_limit, residuals, cotangents):
    hidden, lm_head, targets, logz, entropy, z, temperature = residuals
    g_logp, g_entropy, _ = (c.reshape(-1, 1) for c in cotangents)  # E_vocab: no gradient
    if z is None:
        z = _head_logits(hidden, lm_head, temperature, vocab_limit)
    onehot = _flat_targets(targets) == jnp.arange(z.shape[-1], dtype=jnp.int32)
    dz, d_temperature = _softmax_stats_cotangent(
        z, logz, entropy, onehot, g_logp, g_entropy, temperature
    )
    dz = jax.lax.optimization_barrier(dz.astype(hidden.dtype))  # [rows * C, V], row-major
    w = lm_head.astype(hidden.dtype)
    d_hidden = jnp.dot(dz, w.T, preferred_element_type=jnp.float32).astype(hidden.dtype)
    h_t = jax.lax.optimization_barrier(hidden.reshape(-1, hidden.shape[-1]).T)  # [D, rows * C]
    d_head = jnp.dot(h_t, dz, preferred_element_type=jnp.float32).astype(lm_head.dtype)
    return d_hidden.reshape(hidden.shape), d_head, _targets_cotangent(targets), d_temperature


_head_stats.defvjp(_head_stats_fwd, _head_stats_bwd)


def token_logprobs_and_entropy(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    temperature: float = 1.0,
    chunk_size: int = 128,
    with_vocab_expectation: bool = False,
    vocab_limit: int | None = None,
) -> TokenStats:
    """Per-token log-prob of `targets` and full-vocabulary entropy, from hidden states.

    logits = hidden @ lm_head / temperature, computed chunk by chunk along the length axis in
    float32 (whatever the compute dtype of hidden), so at most `[rows, chunk_size, vocab]` float32
    logits exist at once, forward and backward.

    Args:
      hidden: [rows, T, D] final hidden states (after the final norm) at the positions that
        *predict* targets (position t predicts targets[:, t]).
      lm_head: [D, V] output projection (the transposed embedding for tied models).
      targets: [rows, T] int token ids.
      temperature: the sampling temperature T (SPEC 2: entropy at T).
      chunk_size: positions per chunk.
      with_vocab_expectation: also return sum_a pi_a^2 (log pi_a + H) (SPEC 2.2, `vocab`).
      vocab_limit: static; the distribution is over ids [0, vocab_limit) (the tokenizer's ids,
        where the model's vocabulary is padded past them, as the sampler's `vocab_limit`).

    Returns:
      TokenStats(logp [rows, T], entropy [rows, T], expected_pi_lambda [rows, T] or None), float32;
      logp and entropy are differentiable w.r.t. hidden and lm_head.
    """

    fn = "token_logprobs_and_entropy"
    if jnp.ndim(hidden) != 3 or jnp.ndim(lm_head) != 2 or jnp.shape(targets) != hidden.shape[:2]:
        raise ValueError(
            f"{fn}: expected hidden [rows, T, D], targets [rows, T], lm_head [D, V]; got hidden "
            f"{tuple(jnp.shape(hidden))}, targets {tuple(jnp.shape(targets))}, lm_head "
            f"{tuple(jnp.shape(lm_head))}"
        )
    if lm_head.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"{fn}: lm_head has {lm_head.shape[0]} rows but hidden states have D = "
            f"{hidden.shape[-1]} (pass the [D, V] matrix: the embedding transposed when tied)"
        )
    vocab = _vocab(fn, lm_head.shape[1], vocab_limit)
    _check_head_args(fn, targets, vocab, temperature, chunk_size)

    def chunk_fn(h, t, single_chunk):
        temp = jnp.asarray(temperature, jnp.float32)
        outs = _head_stats(h, lm_head, t, temp, with_vocab_expectation, single_chunk, vocab_limit)
        return outs if with_vocab_expectation else outs[:2]

    return _chunked(chunk_fn, hidden, targets, chunk_size, with_vocab_expectation)


def _vocab(fn, vocab, vocab_limit) -> int:
    """The ids targets may hold: [0, vocab_limit) when given, else the whole vocabulary."""
    if vocab_limit is None:
        return vocab
    if not isinstance(vocab_limit, int | np.integer):
        raise ValueError(f"{fn}: vocab_limit = {vocab_limit!r} must be an int (a number of ids)")
    if not 1 <= vocab_limit:
        raise ValueError(f"{fn}: vocab_limit = {vocab_limit} must be >= 1")
    return min(int(vocab_limit), vocab)


def _check_head_args(fn, targets, vocab, temperature, chunk_size) -> None:
    """Values the log-prob functions cannot work with: checked where they are known (Python
    numbers, concrete targets); inside jit traced values pass unchecked."""
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size = {chunk_size} must be >= 1 (loss.logits_chunk_size)")
    if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
        raise ValueError(
            f"{fn}: targets have dtype {jnp.result_type(targets)}; token ids must be integers "
            "(a float id would be truncated)"
        )
    if checks.concrete(temperature) and np.ndim(temperature) == 0:
        temperature = float(np.asarray(temperature))  # numpy and concrete jax scalars too
    if isinstance(temperature, int | float) and not temperature > 0:
        raise ValueError(
            f"{fn}: temperature = {temperature} must be > 0 (the log-probs and entropy are "
            "taken at the sampling temperature: logits / temperature)"
        )
    if checks.concrete(targets):
        t = np.asarray(targets)
        bad = np.argwhere((t < 0) | (t >= vocab))
        if bad.size:
            row, pos = (int(i) for i in bad[0])
            raise ValueError(
                f"{fn}: targets[{row}, {pos}] = {int(t[row, pos])} is outside the vocabulary "
                f"[0, {vocab}) ({len(bad)} such tokens); pad with a valid id (e.g. 0) and mask"
            )


def logprobs_and_entropy_from_logits(
    logits: jax.Array,
    targets: jax.Array,
    temperature: float = 1.0,
    chunk_size: int = 128,
    with_vocab_expectation: bool = False,
    vocab_limit: int | None = None,
) -> TokenStats:
    """As `token_logprobs_and_entropy`, for a model that already gives logits [rows, T, V].

    The float32 upcast and softmax are still done chunk by chunk, so bf16 logits are never copied
    whole into float32.
    """

    if jnp.ndim(logits) != 3 or jnp.shape(targets) != logits.shape[:2]:
        raise ValueError(
            f"logprobs_and_entropy_from_logits: expected logits [rows, T, V] and targets "
            f"[rows, T]; got logits {tuple(jnp.shape(logits))}, targets "
            f"{tuple(jnp.shape(targets))}"
        )
    fn = "logprobs_and_entropy_from_logits"
    vocab = _vocab(fn, logits.shape[-1], vocab_limit)
    _check_head_args(fn, targets, vocab, temperature, chunk_size)

    def chunk_fn(x, t, single_chunk):
        temp = jnp.asarray(temperature, jnp.float32)
        outs = _logits_stats(x, t, temp, with_vocab_expectation, vocab_limit)
        return outs if with_vocab_expectation else outs[:2]

    return _chunked(chunk_fn, logits, targets, chunk_size, with_vocab_expectation)


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token KL(pi || pi_ref) estimate from sampled-token log-probs (SPEC 4, `kl_coef`).

    With d = logp - ref_logp (the token was sampled from pi):
      k1 = d;  k2 = d^2 / 2;  k3 = exp(-d) + d - 1 (>= 0, unbiased; -d clipped to [-20, 20]).

    Args:
      logp, ref_logp: [rows, T] log-probs of the sampled tokens under the policy and the frozen
        reference, any float dtype (computed in float32).
      estimator: "k1", "k2" or "k3" (Schulman's estimators); anything else is a ValueError.

    Returns:
      [rows, T] float32, unmasked (the caller masks and aggregates).
    """
    log_ratio = jnp.asarray(logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        neg = jnp.clip(-log_ratio, -_KL_CLIP, _KL_CLIP)
        return jnp.exp(neg) - neg - 1.0
    raise ValueError(f"loss.kl_estimator {estimator!r}; choose one of {KL_ESTIMATORS}.")


_KL_CLIP = 20.0


def clipped_token_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float = 10.0,
    clip: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Per-token PPO loss with asymmetric and dual clip (SPEC 4), and the ratio.

    l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));  where A < 0: l = min(l, -A c)
    With clip=False: l = -A r (the KL-Cov baseline's loss).
    """
    ratio = importance_ratio(logp, old_logp)
    a = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    a = jnp.broadcast_to(a[..., None] if a.ndim == ratio.ndim - 1 else a, ratio.shape)
    l1 = -a * ratio
    if not clip:
        return l1, ratio
    l2 = -a * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(l1, l2)
    loss = jnp.where(a < 0, jnp.minimum(loss, -a * dual_clip), loss)
    return loss, ratio


def _check_loss_terms(fn: str, kwargs: dict[str, Any]) -> None:
    """A loss term asked for (a coefficient above 0, as a Python number) without the array it
    needs would silently be left out: name both."""
    needs = (("kl_coef", "ref_logp"), ("entropy_coef", "entropy"), ("abs_kl_coef", "abs_kl_mask"))
    for coef, array in needs:
        value = kwargs.get(coef, 0.0)
        if isinstance(value, int | float) and value != 0 and kwargs.get(array) is None:
            raise ValueError(
                f"{fn}: {coef} = {value} but no {array} was given, so the term would be left "
                f"out: pass {array}=..., or {coef}=0"
            )
    estimator = kwargs.get("kl_estimator", "k3")
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"{fn}: kl_estimator {estimator!r}; choose one of {KL_ESTIMATORS}.")


def _policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float = 10.0,
    loss_agg: str = "token_mean",
    max_response_length: int | None = None,
    ref_logp: jax.Array | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: jax.Array | None = None,
    entropy_coef: float = 0.0,
    grad_mask: jax.Array | None = None,
    abs_kl_mask: jax.Array | None = None,
    abs_kl_coef: float = 0.0,
    clip: bool = True,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The policy loss of one (micro-)batch as an exact (sum, count) pair (SPEC 4).

    Per token: the clipped loss of `clipped_token_loss`, plus kl_coef * KL(pi || pi_ref) when
    `ref_logp` is given, minus entropy_coef * H when `entropy` is given. Aggregation:

    - `token_mean`: sum over valid tokens / number of valid tokens;
    - `seq_mean_token_sum`: mean over rows of the row's token sum;
    - `seq_mean_token_mean`: mean over rows of the row's token mean;
    - `seq_mean_token_sum_norm` (Dr.GRPO): mean over rows of token sum / max_response_length.
    Rows without valid tokens count in no mode.

    Args:
      logp: [rows, T] current log-probs of the sampled tokens (the gradient flows through it).
      old_logp: [rows, T] behaviour-policy log-probs. advantages: [rows] or [rows, T] (final,
        e.g. modulated) advantages, no gradient. mask: [rows, T] response mask, 0 or 1 (any
        dtype; a value other than 0 and 1 is an error, or read as valid where > 0 inside jit).
      max_response_length: the constant divisor of `seq_mean_token_sum_norm` (default T).
      ref_logp, entropy: optional [rows, T] for the KL penalty / entropy bonus.
      grad_mask: optional [rows, T] 0/1 (SPEC 6 baselines Fork Tokens, Clip-Cov): the clipped
        policy term counts only where 1; masked-out tokens still count in the denominator.
      abs_kl_mask, abs_kl_coef: optional [rows, T] 0/1 (KL-Cov): adds
        abs_kl_coef * |logp - old_logp| on the marked tokens.
      clip: False drops the PPO and dual clip (l = -A r; KL-Cov's loss).

    Returns:
      loss_sum, count: float32 scalars; the loss of the union of micro-batches is
        sum(loss_sum) / sum(count), and this pair's loss is loss_sum / max(count, 1).
      aux: float32 *token sums* over valid tokens: `tokens`, `clip_low` (A<0, r<1-eps_low),
        `clip_high` (A>0, r>1+eps_high), `dual_clip`, `ratio`, `approx_kl` (k3 of old vs
        current), `kl` and `entropy` when used. Divide by aux["tokens"] summed likewise.
    """
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss.loss_agg {loss_agg!r}; choose one of {LOSS_AGGREGATIONS}.")
    shape = checks.same_shape(
        "policy_loss",
        "logp",
        dict(
            logp=logp,
            old_logp=old_logp,
            mask=mask,
            ref_logp=ref_logp,
            entropy=entropy,
            grad_mask=grad_mask,
            abs_kl_mask=abs_kl_mask,
        ),
    )
    checks.row_or_token_shape("policy_loss", "advantages", advantages, shape)
    if max_response_length is not None and max_response_length < 1:
        raise ValueError(
            f"policy_loss: max_response_length = {max_response_length} must be >= 1 (the "
            "divisor of seq_mean_token_sum_norm; None: the batch's T)"
        )
    valid = jnp.asarray(mask) > 0  # a 0/1 mask, not a weight (checks.zero_one)
    m = valid.astype(jnp.float32)

    def padded_zero(x):
        # Padding positions are set to 0 before any arithmetic, not multiplied by the mask
        # after it: a NaN or inf there (a -100 pad id gathered inside jit, a -inf log-prob)
        # would survive a product with 0, in the loss and in its gradient.
        if x is None:
            return None
        x = jnp.asarray(x)
        x = x[..., None] if x.ndim == m.ndim - 1 else x
        return jnp.where(valid, x, jnp.zeros((), x.dtype))

    logp, old_logp, advantages = padded_zero(logp), padded_zero(old_logp), padded_zero(advantages)
    ref_logp, entropy = padded_zero(ref_logp), padded_zero(entropy)
    token_loss, ratio = clipped_token_loss(
        logp, old_logp, advantages, eps_low, eps_high, dual_clip, clip
    )
    if grad_mask is not None:
        token_loss = jnp.where(jnp.asarray(grad_mask) > 0, token_loss, 0.0)
    if abs_kl_mask is not None:
        abs_kl = jnp.abs(jnp.asarray(logp, jnp.float32) - jnp.asarray(old_logp, jnp.float32))
        token_loss = (
            token_loss + abs_kl_coef * (jnp.asarray(abs_kl_mask) > 0).astype(jnp.float32) * abs_kl
        )
    a = jnp.asarray(advantages, jnp.float32)  # [rows, T] or [rows, 1] after padded_zero
    aux: dict[str, jax.Array] = {}
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        token_loss = token_loss + kl_coef * kl
        aux["kl"] = jnp.sum(jax.lax.stop_gradient(kl) * m)
    if entropy is not None:
        token_loss = token_loss - entropy_coef * jnp.asarray(entropy, jnp.float32)
        aux["entropy"] = jnp.sum(jax.lax.stop_gradient(entropy) * m)

    token_loss = token_loss * m
    row_tokens = jnp.sum(m, axis=-1)
    row_valid = (row_tokens > 0).astype(jnp.float32)
    if loss_agg == "token_mean":
        loss_sum, count = jnp.sum(token_loss), jnp.sum(m)
    elif loss_agg == "seq_mean_token_sum":
        loss_sum, count = jnp.sum(token_loss), jnp.sum(row_valid)
    elif loss_agg == "seq_mean_token_mean":
        row_mean = jnp.sum(token_loss, axis=-1) / jnp.maximum(row_tokens, 1.0)
        loss_sum, count = jnp.sum(row_mean * row_valid), jnp.sum(row_valid)
    else:
        norm = float(max_response_length or max(m.shape[-1], 1))
        loss_sum, count = jnp.sum(token_loss) / norm, jnp.sum(row_valid)

    r = jax.lax.stop_gradient(ratio)
    log_ratio = jax.lax.stop_gradient(
        jnp.asarray(old_logp, jnp.float32) - jnp.asarray(logp, jnp.float32)
    )
    aux.update(
        tokens=jnp.sum(m),
        clip_low=jnp.sum(valid & (a < 0) & (r < 1.0 - eps_low)).astype(jnp.float32),
        clip_high=jnp.sum(valid & (a > 0) & (r > 1.0 + eps_high)).astype(jnp.float32),
        dual_clip=jnp.sum(valid & (a < 0) & (r > dual_clip)).astype(jnp.float32),
        ratio=jnp.sum(r * m),
        approx_kl=jnp.sum(
            (jnp.exp(jnp.clip(log_ratio, -20, 20)) - jnp.clip(log_ratio, -20, 20) - 1.0) * m
        ),
    )
    return loss_sum, count, aux


_policy_loss_jit = jax.jit(
    _policy_loss, static_argnames=("loss_agg", "kl_estimator", "max_response_length", "clip")
)


@functools.wraps(_policy_loss)
def policy_loss(*args, **kwargs) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    _check_loss_terms("policy_loss", kwargs)  # Python values only: jit would trace them
    named = dict(zip(("logp", "old_logp", "advantages", "mask"), args, strict=False)) | kwargs
    for name in ("mask", "grad_mask", "abs_kl_mask"):
        checks.zero_one("policy_loss", name, named.get(name))
    return _policy_loss_jit(*args, **kwargs)


policy_loss.__name__ = policy_loss.__qualname__ = "policy_loss"


def loss_value(loss_sum: jax.Array, count: jax.Array) -> jax.Array:
    """The mean a (sum, count) pair stands for: loss_sum / count, scalars (float32); 0 for an
    empty batch (count 0), never NaN. Sum the pairs of micro-batches first, then call this."""
    return loss_sum / jnp.maximum(count, 1.0)
