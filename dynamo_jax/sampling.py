"""Rollout sampling: prefill each unique prompt once, fan its KV cache out to its rows, decode.

One call of ``Sampler.generate`` is two compiled programs whose shapes come only from the bucket
grid (``dynamo_jax.buckets``)::

    prefill  tokens [slots, P] -> slot KV cache [layers, slots, kv, P, hd], last logits [slots, V]
    decode   gather the slot cache to rows (row_to_prompt, [rows]), then a lax.while_loop of
             one-token steps over a per-layer [rows, kv, P + M, hd] cache (and per-layer weights
             sliced once per call: each step reads and updates them in place), exiting early
             once every valid row has emitted an EOS token (or after M = max_new_tokens tokens)

gemma-sampler style: what the loop is compiled for is a small frozen dataclass (``DecodeConfig``:
M, EOS ids, pad id, cache dtype); the sampling knobs (``SamplingParams``: temperature, top-p,
top-k, greedy) are traced data, so changing them never recompiles.

Randomness: row r draws its token at step t with
``fold_in(fold_in(fold_in(fold_in(key, lo32(prompt_id)), hi32(prompt_id)), sample_index), t)``.
It depends on nothing else (not on the row's position in the batch, the bucket, the other
prompts or the mesh), so a (prompt id, sample index) pair gives the same response however the
step was packed (up to float reassociation in the matmuls, which only matters at ties).

Token choice is inverse-CDF sampling with one uniform per row, done in two levels over blocks of
the vocabulary (block sums, then a cumulative sum inside the chosen block): one pass over the
logits instead of Gumbel noise for every vocabulary entry.

Log-probs (``Rollouts.response_logp``) are ``log_softmax(logits / temperature)[token]`` under the
FULL distribution, before top-k / top-p filtering, and also for greedy decoding. That is what the
trainer's recomputed log-probs of the same policy at the same temperature are compared against
(filtering is a property of the behaviour policy the trainer does not model).

Top-k / top-p: a threshold filter on traced ``k`` (0 = off) and ``p`` (1 = off), skipped with
``lax.switch`` when both are off (and under greedy). top-k is applied first, top-p on the
renormalised top-k distribution (transformers' order); the kept set is every token whose scaled
logit is >= the last kept one, so exact ties at the cut are all kept. The threshold comes from
the sort-based definition; ``filter_method="bisect"`` (default) finds the same value by bisection
over float32 bit patterns (32 counting passes, exact), because a full-vocabulary sort per row and
step costs ~0.5 s for [64, 32768] on XLA:CPU; ``"sort"`` sorts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dynamo_jax import buckets as bk
from dynamo_jax import sharding as shd
from dynamo_jax.models.transformer import CACHE_LOGICAL_AXES, KVCache

__all__ = [
    "FINISH_EOS",
    "FINISH_LENGTH",
    "FINISH_PADDING",
    "DecodeConfig",
    "Rollouts",
    "Sampler",
    "SamplingParams",
    "row_keys",
    "sample_tokens",
]

FINISH_EOS = 0  # the row emitted one of the EOS ids (it is the last masked token)
FINISH_LENGTH = 1  # the row reached max_new_tokens without EOS
FINISH_PADDING = -1  # a padding row (valid == False)


# ---------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """The static part of the decode program (changing any field recompiles)."""

    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int
    cache_dtype: str | None = None  # None: the model's compute dtype
    filter_method: str = "bisect"  # top-k / top-p threshold: "bisect" or "sort"
    # Tokens are drawn from ids [0, vocab_limit) only: a model's embedding matrix is often
    # padded past the tokenizer (Qwen2.5: 151936 rows, 151665 tokens), and an id the tokenizer
    # does not have would decode to nothing. None: the whole vocabulary.
    vocab_limit: int | None = None


@struct.dataclass
class SamplingParams:
    """Traced sampling knobs (scalars): changing them never recompiles.

    temperature: float32 > 0. top_p: float32 in (0, 1], 1 = off. top_k: int32 >= 0, 0 = off.
    greedy: bool; argmax of the logits (log-probs still at ``temperature``).
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    greedy: jax.Array

    @classmethod
    def make(
        cls, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False
    ) -> SamplingParams:
        """Validated host scalars with fixed dtypes (a dtype change would recompile)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        return cls(
            temperature=np.float32(temperature),
            top_p=np.float32(top_p),
            top_k=np.int32(top_k),
            greedy=np.bool_(greedy),
        )


# ---------------------------------------------------------------------------- token sampling
def _cdf_block(vocab: int) -> int:
    """Block length for the two-level inverse CDF: a divisor of V near sqrt(V) when there is one
    (no padding copy), else round(sqrt(V)) and the vocabulary is padded with zero weights."""
    root = math.sqrt(vocab)
    divisors = [d for d in range(max(1, int(root / 4)), int(4 * root) + 1) if vocab % d == 0]
    if divisors:
        return min(divisors, key=lambda d: abs(math.log(d / root)))
    return max(1, round(root))


def _inverse_cdf(
    logits: jax.Array,
    temperature: jax.Array,
    top: jax.Array,
    threshold: jax.Array,
    u: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Index drawn from softmax(logits / temperature) restricted to scaled logits >= threshold.

    Args:
      logits: [R, V] float32 unscaled logits.
      temperature: scalar > 0.
      top: [R] max of the scaled logits (logits / temperature).
      threshold: [R] smallest kept scaled logit (-inf: keep all).
      u: [R] uniforms in (0, 1).

    Returns:
      (tokens [R] int32, total [R]: sum of exp(logits / temperature - top) over the kept
      tokens). The first index whose cumulative kept weight reaches u * total, over blocks: the
      only full-width work is one block sum of the weights, computed from the logits inside that
      reduction (neither the scaled logits nor the weights are ever materialised at full width).
      A zero-weight or filtered-out index is never returned.
    """
    r, v = logits.shape
    block = _cdf_block(v)
    nb = -(-v // block)
    if nb * block != v:
        logits = jnp.pad(logits, ((0, 0), (0, nb * block - v)), constant_values=-jnp.inf)
    blocks = logits.reshape(r, nb, block)
    top3, thr3 = top[:, None, None], threshold[:, None, None]

    def weight(x: jax.Array) -> jax.Array:  # [R, n, block] logits -> kept weights
        scaled = x / temperature
        return jnp.where(scaled >= thr3, jnp.exp(scaled - top3), 0.0)

    block_sum = weight(blocks).sum(-1)  # [R, nb]
    block_cdf = jnp.cumsum(block_sum, axis=-1)
    total = block_cdf[:, -1]
    target = u * total  # [R]
    b = jnp.minimum(jnp.sum(block_cdf < target[:, None], axis=-1), nb - 1)
    # The cumulative weight before block b, read from the same cumsum, is < target exactly.
    before = jnp.where(b > 0, jnp.take_along_axis(block_cdf, (b - 1)[:, None], -1)[:, 0], 0.0)
    inside = weight(jnp.take_along_axis(blocks, b[:, None, None], axis=1))[:, 0]  # [R, block]
    cdf = before[:, None] + jnp.cumsum(inside, axis=-1)
    i = jnp.sum(cdf < target[:, None], axis=-1)
    # Rounding can leave the in-block sum just short of target: fall back to the last positive.
    idx = jnp.arange(block, dtype=jnp.int32)
    last_positive = jnp.max(jnp.where(inside > 0, idx, 0), axis=-1)
    return (b * block + jnp.minimum(i, last_positive)).astype(jnp.int32), total


def _filter_threshold_sort(
    scaled: jax.Array, weights: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Smallest scaled logit kept by top-k then top-p, per row, by a full sort: [R, V] -> [R].

    The reference method; on CPU a [64, 32768] float32 sort takes ~0.5 s, hence "bisect".
    """
    del weights
    v = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)  # [R, V], descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    # Every logit tied with the k-th is kept, as the bisection does (and transformers' top-k).
    kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, desc.shape[:-1])[..., None], -1)
    in_k = desc >= kth
    probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # p == 1 keeps everything even when float cumsums reach 1 early in the tail.
    keep = in_k & ((mass_before < top_p) | (top_p >= 1.0))  # a prefix; index 0 always kept
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    return jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)[:, 0]


_SIGN = np.uint32(0x80000000)
_MAGNITUDE = np.int32(0x7FFFFFFF)


def _ordered(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (x < y iff key(x) < key(y); -0.0 < +0.0)."""
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    i = jnp.where(i < 0, i ^ _MAGNITUDE, i)  # negative floats: larger magnitude = smaller
    return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ _SIGN


def _unordered(key: jax.Array) -> jax.Array:
    """Inverse of ``_ordered``."""
    i = jax.lax.bitcast_convert_type(key ^ _SIGN, jnp.int32)
    return jax.lax.bitcast_convert_type(jnp.where(i < 0, i ^ _MAGNITUDE, i), jnp.float32)


def _largest_key_where(lo: jax.Array, hi: jax.Array, holds) -> jax.Array:
    """Per row, the largest t in [lo, hi] with ``holds(t)`` true, for ``holds`` true at lo and
    monotone (true up to some t, false above). 32 halvings of the uint32 range are exact."""

    def body(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        mid = lo + gap // 2 + (gap & 1)  # ceil((lo + hi) / 2) without uint32 overflow
        ok = holds(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def _filter_threshold_bisect(
    scaled: jax.Array, weights: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Same threshold as ``_filter_threshold_sort``, by bisection on the float order.

    The k-th largest value is the largest t with #{x >= t} >= k; the top-p cut is the largest t
    with mass{x >= t} >= p * mass{x >= t_k}. Each is 32 counting passes over [R, V] (and exact:
    the search runs over the bit patterns of float32), far cheaper than a sort on CPU.
    """
    v = scaled.shape[-1]
    keys = _ordered(scaled)  # [R, V]
    lo, hi = jnp.min(keys, axis=-1), jnp.max(keys, axis=-1)
    k = jnp.minimum(top_k, v)

    def kth(lo):
        return _largest_key_where(lo, hi, lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= k)

    t_k = jax.lax.cond((top_k > 0) & (top_k < v), kth, lambda lo: lo, lo)
    in_k = keys >= t_k[:, None]
    mass_k = jnp.sum(jnp.where(in_k, weights, 0.0), axis=-1)

    def nucleus(t_k):
        def holds(t):
            return jnp.sum(jnp.where(keys >= t[:, None], weights, 0.0), axis=-1) >= top_p * mass_k

        return _largest_key_where(t_k, hi, holds)

    t = jax.lax.cond(top_p < 1.0, nucleus, lambda t_k: t_k, t_k)
    return _unordered(t)


FILTERS = {"bisect": _filter_threshold_bisect, "sort": _filter_threshold_sort}


def sample_tokens(
    logits: jax.Array,
    keys: jax.Array,
    params: SamplingParams,
    filter_method: str = "bisect",
    vocab_limit: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row.

    Args:
      logits: [R, V] float32 unscaled logits.
      keys: [R] typed PRNG keys, one per row (already folded with the step).
      params: traced knobs.
      filter_method: static; "bisect" (default) or "sort" for the top-k / top-p threshold.
      vocab_limit: static; draw from ids [0, vocab_limit) only (the tokenizer's ids, where the
        model's vocabulary is padded past them); log-probs are then normalised over those ids.

    Returns:
      (tokens [R] int32, logp [R] float32 = log_softmax(logits / temperature)[token] under the
      full, unfiltered distribution).

    Without a filter the logits are read twice (max, then the block sums of the weights) and
    nothing [R, V] is written: at a 152k vocabulary each extra full-width pass costs
    milliseconds per decode step on CPU. Only the filter branch materialises the scaled logits
    and weights.
    """
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits[:, :vocab_limit]  # a slice XLA fuses into the reads below
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    temperature = params.temperature
    # max(logits / T) == max(logits) / T exactly (rounding is monotone), in one pass.
    logit_max = jnp.max(logits, axis=-1)  # [R]
    top = logit_max / temperature
    tiny = jnp.finfo(jnp.float32).tiny
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, tiny, 1.0))(keys)
    no_filter = jnp.full(logits.shape[:1], -jnp.inf, jnp.float32)

    def normaliser(logits: jax.Array) -> jax.Array:  # [R] sum of exp(scaled - top)
        return jnp.sum(jnp.exp(logits / temperature - top[:, None]), axis=-1)

    def plain(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Nothing filtered: the draw's total is the full normaliser.
        return _inverse_cdf(logits, temperature, top, no_filter, u)

    def filtered(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        scaled = logits / temperature
        weights = jnp.exp(scaled - top[:, None])
        threshold = FILTERS[filter_method](scaled, weights, params.top_k, params.top_p)
        tokens, _ = _inverse_cdf(logits, temperature, top, threshold, u)
        return tokens, jnp.sum(weights, axis=-1)

    def argmax(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        # First index at the max: XLA:CPU's variadic argmax reduce is ~10x slower.
        hit = logits == logit_max[:, None]
        tokens = jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
        return tokens, normaliser(logits)

    need_filter = (params.top_k > 0) | (params.top_p < 1.0)
    branch = jnp.where(params.greedy, 2, jnp.where(need_filter, 1, 0))
    tokens, z = jax.lax.switch(branch, (plain, filtered, argmax), logits)
    token_logit = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return tokens, token_logit / temperature - top - jnp.log(z)


def row_keys(key: jax.Array, prompt_id: jax.Array, sample_index: jax.Array) -> jax.Array:
    """Per-row keys from (step key, int64 prompt id as two uint32 halves, sample index).

    Args:
      key: a typed PRNG key (scalar).
      prompt_id: [R, 2] uint32 (low, high) halves of the int64 prompt id.
      sample_index: [R] int32.
    """

    def one(ids: jax.Array, s: jax.Array) -> jax.Array:
        k = jax.random.fold_in(key, ids[0])
        k = jax.random.fold_in(k, ids[1])
        return jax.random.fold_in(k, s)

    return jax.vmap(one)(prompt_id, sample_index)


def _split_ids(prompt_id: np.ndarray) -> np.ndarray:
    """[R] int64 -> [R, 2] uint32 (low, high) so ids beyond 2**32 still seed distinct rows."""
    u = np.asarray(prompt_id, np.int64).view(np.uint64)
    return np.stack([u & 0xFFFFFFFF, u >> 32], axis=-1).astype(np.uint32)


# ---------------------------------------------------------------------------- device programs
def _prefill(
    graphdef: nnx.GraphDef,
    cfg: DecodeConfig,
    traces: dict[str, int],
    state: Any,
    tokens: jax.Array,
    lengths: jax.Array,
) -> tuple[KVCache, jax.Array]:
    """tokens [slots, P] right-padded, lengths [slots] -> (slot cache, last logits [slots, V]).

    Only the hidden state at each prompt's last token goes through the LM head: full logits
    would be [slots, P, V] float32.
    """
    traces["prefill"] += 1  # runs at trace time only: counts compiled programs
    model = nnx.merge(graphdef, state)
    slots, p = tokens.shape
    cache = model.init_cache(slots, p, dtype=cfg.cache_dtype)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (slots, p))
    write = positions < lengths[:, None]  # pad tokens never enter the cache
    hidden, cache = model.decode(tokens, positions, cache, write_mask=write, return_hidden=True)
    last = jnp.maximum(lengths - 1, 0)  # padding slots (length 0) read index 0; never used
    hidden_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [slots, E]
    return cache, model.logits_from_hidden(hidden_last)


def _decode(
    graphdef: nnx.GraphDef,
    cfg: DecodeConfig,
    traces: dict[str, int],
    layout: tuple[Mesh | None, Any],
    state: Any,
    slot_cache: KVCache,
    slot_logits: jax.Array,
    slot_lengths: jax.Array,
    row_to_prompt: jax.Array,
    prompt_id: jax.Array,
    sample_index: jax.Array,
    valid: jax.Array,
    key: jax.Array,
    params: SamplingParams,
    row_cache: KVCache,
) -> dict[str, Any]:
    """Fan-out + decode loop. ``layout`` = (mesh or None, logical rules) pins the row cache's
    sharding, so the buffer handed back for reuse always matches the next call's input.
    Row arrays are [R]; ``row_cache`` (per-layer KVCache: tuples of [R, kv, P + M, hd]) is a
    donated scratch buffer (contents ignored) that comes back as ``out["cache"]`` for reuse.

    Returns a dict: tokens [R, M] int32, logp [R, M] float32, lengths [R] int32, finish [R] int32,
    steps (scalar: decode positions computed, <= M), cache.
    """
    traces["decode"] += 1
    model = nnx.merge(graphdef, state)
    m = cfg.max_new_tokens
    rows = row_to_prompt.shape[0]
    mesh, rules = layout
    pad = jnp.int32(cfg.pad_id)
    eos = jnp.asarray(cfg.eos_ids, jnp.int32)

    def is_eos(t: jax.Array) -> jax.Array:
        if not cfg.eos_ids:
            return jnp.zeros(t.shape, bool)
        return jnp.any(t[:, None] == eos[None, :], axis=-1)

    # Fan out: each row reads its prompt's P cache slots into the first P slots of its own
    # (reused) buffer; the index array has the row-bucket length, never a data-dependent one.
    # The row cache is per layer (one buffer per layer and k/v) and so are the weights, sliced
    # here once: the loop body then updates and reads every layer's cache and weights in place,
    # where the stacked layout would copy a layer's slice of each at every step.
    def fan_out(bufs: tuple[jax.Array, ...], src: jax.Array) -> tuple[jax.Array, ...]:
        out = []
        for i, buf in enumerate(bufs):
            rows_src = jnp.take(src[i], row_to_prompt, axis=0).astype(buf.dtype)
            buf = jax.lax.dynamic_update_slice(buf, rows_src, (0, 0, 0, 0))
            out.append(shd.with_logical_constraint(buf, CACHE_LOGICAL_AXES[1:], mesh, rules))
        return tuple(out)

    cache = KVCache(k=fan_out(row_cache.k, slot_cache.k), v=fan_out(row_cache.v, slot_cache.v))
    # Weights sliced per layer and cast to the compute dtype once, outside the loop: with
    # float32 master weights and bfloat16 compute, a cast inside the body converted every
    # weight at every step (sampling was 29% slower in bfloat16 than in float32 on an H100).
    layers = model.layer_params()
    head = model.decode_head()
    lengths = slot_lengths[row_to_prompt]  # [R]
    keys = row_keys(key, prompt_id, sample_index)  # [R]

    def step_keys(t: jax.Array) -> jax.Array:
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)

    first, first_logp = sample_tokens(
        slot_logits[row_to_prompt],
        step_keys(jnp.int32(0)),
        params,
        cfg.filter_method,
        cfg.vocab_limit,
    )
    tokens = jnp.full((rows, m), pad, jnp.int32).at[:, 0].set(jnp.where(valid, first, pad))
    logp = jnp.zeros((rows, m), jnp.float32).at[:, 0].set(jnp.where(valid, first_logp, 0.0))
    done = ~valid | is_eos(first)
    resp_len = valid.astype(jnp.int32)

    def cond(carry):
        t, _, _, _, done, _, _ = carry
        return (t < m) & ~jnp.all(done)

    def body(carry):
        t, last, tokens, logp, done, resp_len, cache = carry
        # The token sampled at step t-1 sits at position len + t - 1 (cache slot == position).
        positions = (lengths + t - 1)[:, None]
        hidden, cache = model.decode(
            last[:, None], positions, cache, layer_params=layers, return_hidden=True
        )
        logits = model.logits_from_hidden(hidden[:, 0], head)
        new, new_logp = sample_tokens(
            logits, step_keys(t), params, cfg.filter_method, cfg.vocab_limit
        )
        active = ~done
        col = (0, t)
        tokens = jax.lax.dynamic_update_slice(tokens, jnp.where(active, new, pad)[:, None], col)
        logp = jax.lax.dynamic_update_slice(logp, jnp.where(active, new_logp, 0.0)[:, None], col)
        resp_len = resp_len + active.astype(jnp.int32)
        done = done | is_eos(new)
        return t + 1, new, tokens, logp, done, resp_len, cache

    carry = (jnp.int32(1), first, tokens, logp, done, resp_len, cache)
    steps, _, tokens, logp, _, resp_len, cache = jax.lax.while_loop(cond, body, carry)
    last_token = jnp.take_along_axis(tokens, jnp.maximum(resp_len - 1, 0)[:, None], -1)[:, 0]
    finish = jnp.where(
        ~valid, FINISH_PADDING, jnp.where(is_eos(last_token), FINISH_EOS, FINISH_LENGTH)
    ).astype(jnp.int32)
    return {
        "tokens": tokens,
        "logp": logp,
        "lengths": resp_len,
        "finish": finish,
        "steps": steps,
        "cache": cache,
    }


# ---------------------------------------------------------------------------- host side
@dataclasses.dataclass(frozen=True, eq=False)
class Rollouts:
    """Sampled responses on the host, one row per rollout ([R] = plan.num_rows, M, P static).

    Attributes:
      prompt_id: [R] int64 dataset id (-1 on padding rows).
      group_id: [R] int32 the prompt's position in this step's batch, in [0, N).
      sample_index: [R] int32 index within the group (+ the prompt's sample offset).
      valid: [R] bool; padding rows have valid False, an all-zero mask and FINISH_PADDING.
      prompt_tokens: [R, P] int32 right-padded prompt of each row (padding rows: slot 0's).
      prompt_lengths: [R] int32.
      response_tokens: [R, M] int32, pad_id after the end.
      response_logp: [R, M] float32 log_softmax(logits / temperature) of the sampled token under
        the full (unfiltered) distribution; 0 after the end.
      response_mask: [R, M] float32, 1 up to and including the EOS token.
      response_lengths: [R] int32 = response_mask.sum(-1).
      finish_reason: [R] int32 FINISH_EOS (0), FINISH_LENGTH (1), FINISH_PADDING (-1).
      plan: the SamplingPlan (static dims and index arrays).
      temperature: the temperature the log-probs are at.
      num_decode_steps: positions the loop ran (<= M; < M after an early exit).
      timings: wall-clock seconds: {"total_s"}, or {"prefill_s", "decode_s"} with timed=True
        (decode_s includes the copy of the results to the host).
    """

    prompt_id: np.ndarray
    group_id: np.ndarray
    sample_index: np.ndarray
    valid: np.ndarray
    prompt_tokens: np.ndarray
    prompt_lengths: np.ndarray
    response_tokens: np.ndarray
    response_logp: np.ndarray
    response_mask: np.ndarray
    response_lengths: np.ndarray
    finish_reason: np.ndarray
    plan: bk.SamplingPlan
    temperature: float
    num_decode_steps: int
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.valid.shape[0])

    def responses(self) -> list[list[int]]:
        """Response token lists of the valid rows (EOS included), in row order."""
        return [
            self.response_tokens[r, : self.response_lengths[r]].tolist()
            for r in np.flatnonzero(self.valid)
        ]


def _state(params_or_model: Any) -> Any:
    if isinstance(params_or_model, nnx.Module):
        return nnx.state(params_or_model)
    return params_or_model


def _host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


@functools.lru_cache(maxsize=64)
def _zeros_program(shape: tuple[int, ...], dtype: Any, count: int, sharding: Any) -> Any:
    """One jitted program per (shape, dtype, count, sharding) that creates `count` zero arrays
    where they live. Cached: a fresh ``jax.jit`` of a new lambda compiled again at every call,
    once per RL step after the trainer releases the row cache."""
    return jax.jit(
        lambda: tuple(jnp.zeros(shape, dtype) for _ in range(count)),
        out_shardings=None if sharding is None else (sharding,) * count,
    )


class Sampler:
    """Compiled rollout sampler; build once, call ``generate`` every step.

    Args:
      model: the Transformer (or its ``nnx.GraphDef``); only its structure is kept, parameters
        are passed to each ``generate`` call.
      eos_ids: tokens that end a response (may be empty: always max_new_tokens).
      pad_id: filler for padded prompts and for response positions after the end.
      spec: bucket grid (its max_new_tokens is the decode length).
      cache_dtype: KV-cache dtype (default: the model's compute dtype).
      mesh: place prompt/row arrays over ("data", "fsdp"); default: the model's mesh if it has
        one. Parameters must already live on this mesh (``sharding.shard_model`` or
        ``init_model(mesh=...)``).
      rules: logical-axis rules for the KV cache (default: the model's, else DEFAULT_RULES).
      reuse_buffers: keep the row KV cache between calls and donate it to the next one of the
        same cache shape (fresh multi-GB buffers are slow to fault in); a call of another shape
        drops it first, so one cache at most is kept; ``release_buffers()`` frees it.
      filter_method: how the top-k / top-p threshold is found: "bisect" (default; 32 counting
        passes per filter, exact) or "sort" (a full-vocabulary sort per row and step).
      vocab_limit: draw only ids below this (the tokenizer's size, where the model's vocabulary
        is padded past it); None: every id the model has.
    """

    def __init__(
        self,
        model: nnx.Module | nnx.GraphDef,
        *,
        eos_ids: Sequence[int],
        pad_id: int,
        spec: bk.BucketSpec,
        cache_dtype: Any = None,
        mesh: Mesh | None = None,
        rules: Mapping[str, Any] | None = None,
        reuse_buffers: bool = True,
        filter_method: str = "bisect",
        vocab_limit: int | None = None,
    ):
        if filter_method not in FILTERS:
            raise ValueError(
                f"filter_method must be one of {sorted(FILTERS)}, got {filter_method!r}"
            )
        if isinstance(model, nnx.Module):
            graphdef = nnx.graphdef(model)
            mesh = getattr(model, "mesh", None) if mesh is None else mesh
            if rules is None and getattr(model, "rules", None) is not None:
                rules = dict(model.rules)
        else:
            graphdef = model
        self.graphdef = graphdef
        # Known when built from a module: prompt tokens are checked against it (the embedding
        # lookup would clamp an out-of-range id silently).
        self.vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        self.spec = spec
        self.mesh = mesh
        self.rules = shd.DEFAULT_RULES if rules is None else rules
        self.config = DecodeConfig(
            max_new_tokens=spec.max_new_tokens,
            eos_ids=tuple(int(e) for e in eos_ids),
            pad_id=int(pad_id),
            cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype).name,
            filter_method=filter_method,
            vocab_limit=None if vocab_limit is None else int(vocab_limit),
        )
        self.reuse_buffers = reuse_buffers
        self._traces = {"prefill": 0, "decode": 0}
        self._buffers: dict[tuple[int, ...], KVCache] = {}
        # Instance-level jits: the compile cache (and its count) belongs to this sampler and is
        # keyed only by array shapes, i.e. by the bucket dims.
        self._prefill = jax.jit(functools.partial(_prefill, graphdef, self.config, self._traces))
        self._decode = jax.jit(
            functools.partial(
                _decode, graphdef, self.config, self._traces, (self.mesh, self.rules)
            ),
            donate_argnames=("row_cache",),
        )

    # ------------------------------------------------------------------ helpers
    @property
    def batch_shards(self) -> int:
        """How many ways the prompt/row axis is split (1 without a mesh)."""
        if self.mesh is None:
            return 1
        return int(np.prod([self.mesh.shape[a] for a in shd.BATCH_AXES]))

    def num_compilations(self) -> dict[str, int]:
        """Programs traced (== compiled) so far: {"prefill": n, "decode": n}."""
        return dict(self._traces)

    def release_buffers(self) -> None:
        """Drops the reused KV-cache buffers (e.g. to free memory for the train step)."""
        self._buffers.clear()

    def plan(
        self,
        prompt_ids: Sequence[int],
        prompt_lengths: Sequence[int],
        group_sizes: Sequence[int],
        sample_offsets: Sequence[int] | None = None,
    ) -> bk.SamplingPlan:
        """``buckets.plan`` with this sampler's spec and mesh divisibility."""
        return bk.plan(
            prompt_ids,
            prompt_lengths,
            group_sizes,
            self.spec,
            sample_offsets=sample_offsets,
            multiple_of=self.batch_shards,
        )

    def _put(self, x: np.ndarray) -> jax.Array:
        """Host array -> device; [slots|rows, ...] arrays split over the batch axes of the mesh."""
        if self.mesh is None:
            return jnp.asarray(x)
        spec = PartitionSpec(shd.BATCH_AXES) if x.ndim else PartitionSpec()
        sharding = NamedSharding(self.mesh, spec)
        # From the full host copy on every process (works multi-host too).
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def _row_cache(self, cache_shape: tuple[int, ...], dtype: Any, like: jax.Array) -> KVCache:
        """The reused (or a fresh) per-layer row cache for a stacked ``cache_shape``.

        A fresh buffer is committed to the device(s) of ``like`` (the prefill's cache): the
        buffers the decode hands back are committed whenever any input is, and committedness is
        part of the compile key, so an uncommitted first buffer recompiled the decode on the
        second call when the parameters were committed.
        """
        buf = self._buffers.pop((*cache_shape, jnp.dtype(dtype).num), None)
        if buf is not None:
            return buf
        # A kept cache of another shape (another prompt-length bucket) must not live beside the
        # new one: at most one row cache exists at a time, as the memory plan counts.
        self._buffers.clear()
        layer_shape = cache_shape[1:]
        if self.mesh is not None:
            sharding = shd.logical_to_sharding(
                CACHE_LOGICAL_AXES[1:], self.mesh, self.rules, layer_shape
            )
        elif len(like.devices()) == 1:
            sharding = jax.sharding.SingleDeviceSharding(next(iter(like.devices())))
        else:
            sharding = None
        n = cache_shape[0]
        zeros = _zeros_program(tuple(layer_shape), jnp.dtype(dtype), 2 * n, sharding)()
        return KVCache(k=zeros[:n], v=zeros[n:])

    # ------------------------------------------------------------------ the call
    def generate(
        self,
        params_or_model: Any,
        prompts: Sequence[Sequence[int]],
        prompt_ids: Sequence[int],
        group_sizes: Sequence[int],
        key: jax.Array,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        greedy: bool = False,
        sample_offsets: Sequence[int] | None = None,
        timed: bool = False,
    ) -> Rollouts:
        """Samples ``group_sizes[i]`` responses to ``prompts[i]``.

        Args:
          params_or_model: the model, or its state (``nnx.state(model)``) matching the graphdef.
          prompts: N token-id lists (each >= 1 token, at most the largest prompt bucket).
          prompt_ids: [N] dataset ids (seed each row's randomness together with sample index).
          group_sizes: [N] rows per prompt (n_i >= 0).
          key: the step's PRNG key (typed ``jax.random.key`` or raw uint32[2]).
          temperature, top_p, top_k, greedy: traced knobs (see SamplingParams).
          sample_offsets: [N] first sample index per prompt (default 0).
          timed: wait for the prefill before starting the decode so ``Rollouts.timings`` splits
            prefill_s / decode_s (otherwise only total_s; the wait costs microseconds).

        Returns:
          Rollouts on the host.
        """
        state = _state(params_or_model)
        params = SamplingParams.make(temperature, top_p, top_k, greedy)
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        lengths = [len(p) for p in prompts]
        plan = self.plan(prompt_ids, lengths, group_sizes, sample_offsets)
        tokens, slot_lengths = bk.pad_prompts(
            prompts, plan.prompt_len, self.config.pad_id, plan.num_prompt_slots
        )
        if self.vocab_size is not None:
            real = np.arange(tokens.shape[1])[None, :] < slot_lengths[:, None]
            bad = np.argwhere(real & ((tokens < 0) | (tokens >= self.vocab_size)))
            if bad.size:
                i, pos = (int(x) for x in bad[0])
                raise ValueError(
                    f"prompt {i} (id {prompt_ids[i]}) has token {int(tokens[i, pos])} at "
                    f"position {pos}, outside the model's vocabulary [0, {self.vocab_size}) "
                    f"({len(bad)} such tokens): is the tokenizer the model's?"
                )

        start = time.perf_counter()
        slot_cache, slot_logits = self._prefill(state, self._put(tokens), self._put(slot_lengths))
        if timed:
            jax.block_until_ready(slot_logits)
        prefilled = time.perf_counter()
        c = slot_cache.k.shape
        cache_shape = (c[0], plan.num_rows, c[2], plan.prompt_len + plan.max_new_tokens, c[4])
        out = self._decode(
            state,
            slot_cache,
            slot_logits,
            self._put(slot_lengths),
            self._put(plan.row_to_prompt),
            self._put(_split_ids(plan.prompt_id)),
            self._put(plan.sample_index),
            self._put(plan.valid),
            key,
            params,
            row_cache=self._row_cache(cache_shape, slot_cache.k.dtype, slot_cache.k),
        )
        if self.reuse_buffers:
            self._buffers[(*cache_shape, jnp.dtype(slot_cache.k.dtype).num)] = out["cache"]

        out = {name: _host(x) for name, x in out.items() if name != "cache"}
        done = time.perf_counter()
        resp_len = out["lengths"]
        m = plan.max_new_tokens
        mask = (np.arange(m)[None, :] < resp_len[:, None]).astype(np.float32)
        return Rollouts(
            prompt_id=plan.prompt_id,
            group_id=plan.group_id,
            sample_index=plan.sample_index,
            valid=plan.valid,
            prompt_tokens=tokens[plan.row_to_prompt],
            prompt_lengths=slot_lengths[plan.row_to_prompt],
            response_tokens=out["tokens"],
            response_logp=out["logp"],
            response_mask=mask,
            response_lengths=resp_len,
            finish_reason=out["finish"],
            plan=plan,
            temperature=float(temperature),
            num_decode_steps=int(out["steps"]),
            timings={"prefill_s": prefilled - start, "decode_s": done - prefilled}
            if timed
            else {"total_s": done - start},
        )

    def prefill(
        self, params_or_model: Any, prompts: Sequence[Sequence[int]]
    ) -> tuple[KVCache, jax.Array]:
        """Prefills prompts alone (one slot each, bucketed): (slot cache, last logits [slots, V]).

        What ``generate`` runs first; exposed for benchmarks and evaluation tooling.
        """
        n = len(prompts)
        plan = self.plan(np.arange(n), [len(p) for p in prompts], np.zeros(n, np.int64))
        tokens, lengths = bk.pad_prompts(
            prompts, plan.prompt_len, self.config.pad_id, plan.num_prompt_slots
        )
        return self._prefill(_state(params_or_model), self._put(tokens), self._put(lengths))
