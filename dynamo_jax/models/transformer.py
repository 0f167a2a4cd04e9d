"""Decoder-only transformer (Qwen2/Qwen2.5, Llama 3, Qwen3) in Flax NNX.

One module, ``Transformer``, covers the three families; the differences live in ``ModelConfig``
(q/k/v bias, q/k RMSNorm on heads, llama3 RoPE scaling, tied embeddings, head_dim).

Parameters are stacked over layers. Deep models run the layers under ``jax.lax.scan`` (compile time
does not grow with depth); models with at most ``UNROLL_MAX_LAYERS`` layers, and decode steps given
per-layer weights and cache, run them as a Python loop. MLP layers (and, with a cache, the
attention projections) are plain 2-D matmuls over flattened rows, and attention with a cache is two
batched matmuls with the batch dims leading: the fast paths of XLA:CPU (see ``_dense``,
``_attention`` and docs/MODELS.md). Every parameter carries logical axis names in its
``out_sharding`` metadata (mapped to mesh axes by ``dynamo_jax.sharding`` rules)::

    embed               [vocab, embed]                    ("vocab", "embed")
    lm_head (untied)    [embed, vocab]                    ("embed", "vocab")
    final_norm          [embed]                           ("norm",)
    layers.attn_norm    [layers, embed]                   ("layers", "norm")
    layers.wq           [layers, embed, heads, head_dim]  ("layers", "embed", "heads", "head_dim")
    layers.wk, wv       [layers, embed, kv, head_dim]     ("layers", "embed", "kv_heads", ...)
    layers.bq           [layers, heads, head_dim]         ("layers", "heads", "head_dim")
    layers.bk, bv       [layers, kv, head_dim]            ("layers", "kv_heads", "head_dim")
    layers.wo           [layers, heads, head_dim, embed]  ("layers", "heads", "head_dim", "embed")
    layers.bo           [layers, embed]                   ("layers", "norm")
    layers.q_norm, k_norm [layers, head_dim]              ("layers", "norm")
    layers.mlp_norm     [layers, embed]                   ("layers", "norm")
    layers.w_gate, w_up [layers, embed, mlp]              ("layers", "embed", "mlp")
    layers.w_down       [layers, mlp, embed]              ("layers", "mlp", "embed")

API (B = batch rows, T = tokens in the call, S = cache slots, V = vocab, E = hidden size)::

    model(input_ids[B, T], positions=None, attention_mask=None, *, return_hidden=False)
        -> logits [B, T, V] float32, or final hidden states [B, T, E] (after the final norm,
           compute dtype) with return_hidden=True. No cache. Attention is causal in *index*
           order and masks keys where attention_mask[B, T] is 0; positions default to
           arange(T) for every row (pass them for left-padded or gapped rows).
    model.hidden_states(input_ids, positions=None, attention_mask=None)  # == return_hidden
    model.lm_head_weight() -> [E, V] (param dtype; the embedding transposed when tied)
    model.logits_from_hidden(hidden[..., E]) -> [..., V] float32

    cache = model.init_cache(batch, max_len, dtype=None)      # KVCache, zeros
    logits, cache = model.decode(tokens[B, T], positions[B, T], cache,
                                 write_mask=None, return_hidden=False, layer_params=None)

    # In a decode loop: per-layer weights (sliced and cast to the compute dtype once) and a
    # per-layer cache, both read and updated in place by every step instead of copied out of
    # the stacked arrays (and converted) at every step.
    layers = model.layer_params()                              # before the loop
    head = model.decode_head()                                 # before the loop
    cache = cache.unstacked()                                  # k, v: tuples of [B, K, S, D]
    h, cache = model.decode(tok, pos, cache, layer_params=layers, return_hidden=True)
    logits = model.logits_from_hidden(h, head)                 # in the loop body

KV cache: ``KVCache(k, v)``, a pytree of two arrays [layers, B, kv_heads, S, head_dim] (batch on
axis 1 for both, so ``jax.tree.map(lambda x: x[:, row_to_prompt], cache)`` fans prompts out to
rows); ``cache.unstacked()`` / ``cache.stacked()`` convert to / from the per-layer layout (tuples
of [B, kv_heads, S, head_dim]). Convention: **cache slot == position**, prompts are
**right-padded**. ``decode`` writes each token's key/value at slot ``positions[b, t]`` and a query
at position p attends to slots ``<= p`` of its own row. Hence a batch of prompts with different
lengths is prefilled as one right-padded [B, P] call with ``positions = arange(P)``; row b's first
sampled token comes from ``logits[b, len_b - 1]`` and is decoded at position ``len_b``, overwriting
pad garbage before any query can see it (pad slots always sit at positions > the query's).
``write_mask[B, T]`` (False = do not write) keeps pad tokens out of the cache entirely; writes at
slots >= S are dropped. Positions must be < S and increase along a row's decode steps.

Everything is jittable: ``nnx.jit(lambda m, ids: m(ids))(model, ids)`` or ``graphdef, state =
nnx.split(model)`` and ``nnx.merge(graphdef, state)`` inside ``jax.jit``.

Numerics follow transformers: RMSNorm in float32 then cast, RoPE cos/sin in float32, softmax in
float32, logits accumulated in float32. ``dtype`` is the compute dtype, ``param_dtype`` the
storage dtype (e.g. bfloat16 compute on float32 master weights).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import Mesh

from dynamo_jax import sharding as shd
from dynamo_jax.models.config import ModelConfig

CACHE_LOGICAL_AXES = ("layers", "batch", "kv_heads", "cache_len", "head_dim")
# Models with at most this many layers run them as a Python loop instead of ``lax.scan``. On
# XLA:CPU the scan slices (copies) every stacked weight per layer, and its backward stacks
# residuals and accumulates weight gradients through dynamic-update-slices: unrolled, a 2-layer
# model's gradient took 0.55x the time. Deeper models keep the scan (compile time constant in
# depth).
UNROLL_MAX_LAYERS = 4
_ACT_AXES = ("batch", "length", "act_embed")
# Finite rather than -inf so a fully masked query row gives a uniform (ignored) distribution
# instead of NaNs that would poison gradients.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@struct.dataclass
class KVCache:
    """Keys and values of every layer, in one of two layouts holding the same numbers:

    stacked (``init_cache``, the public layout): k, v [layers, batch, kv_heads, max_len, head_dim];
    per-layer (``unstacked()``): k, v tuples of ``layers`` arrays [batch, kv_heads, max_len,
    head_dim]. ``decode`` takes either and returns the layout it was given. A decode loop
    (the sampler's) carries the per-layer layout: each layer's cache is then its own buffer, which
    XLA updates and reads in place, where the stacked layout copies a layer's slice every step.
    """

    k: Any
    v: Any

    @property
    def is_stacked(self) -> bool:
        return not isinstance(self.k, (tuple, list))

    @property
    def max_len(self) -> int:
        return self.k.shape[3] if self.is_stacked else self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1] if self.is_stacked else self.k[0].shape[0]

    def unstacked(self) -> KVCache:
        """The per-layer layout (tuples of [batch, kv_heads, max_len, head_dim] arrays)."""
        if not self.is_stacked:
            return self
        n = self.k.shape[0]
        return KVCache(k=tuple(self.k[i] for i in range(n)), v=tuple(self.v[i] for i in range(n)))

    def stacked(self) -> KVCache:
        """The stacked layout ([layers, batch, kv_heads, max_len, head_dim] arrays)."""
        if self.is_stacked:
            return self
        return KVCache(k=jnp.stack(self.k), v=jnp.stack(self.v))


def _param(value: jax.Array, names: tuple[str | None, ...], init: str = "normal") -> nnx.Param:
    # eager_sharding=False: flax would otherwise try to shard by these (logical) names at
    # creation and fail without a mesh; placement is done by dynamo_jax.sharding instead.
    # `init` ("normal" | "ones" | "zeros") lets init_model re-create values without the module.
    return nnx.Param(value, out_sharding=names, eager_sharding=False, init=init)


class LayerStack(nnx.Module):
    """All decoder layers' parameters, stacked on a leading [layers] axis."""

    def __init__(self, c: ModelConfig, param_dtype: Any, rngs: nnx.Rngs):
        n, e, h, k, d, f = (
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.intermediate_size,
        )
        normal = nnx.initializers.normal(0.02)

        def w(shape, names):
            return _param(normal(rngs.params(), shape, param_dtype), names)

        def ones(shape, names):
            return _param(jnp.ones(shape, param_dtype), names, "ones")

        def zeros(shape, names):
            return _param(jnp.zeros(shape, param_dtype), names, "zeros")

        self.attn_norm = ones((n, e), ("layers", "norm"))
        self.wq = w((n, e, h, d), ("layers", "embed", "heads", "head_dim"))
        self.wk = w((n, e, k, d), ("layers", "embed", "kv_heads", "head_dim"))
        self.wv = w((n, e, k, d), ("layers", "embed", "kv_heads", "head_dim"))
        if c.qkv_bias:
            self.bq = zeros((n, h, d), ("layers", "heads", "head_dim"))
            self.bk = zeros((n, k, d), ("layers", "kv_heads", "head_dim"))
            self.bv = zeros((n, k, d), ("layers", "kv_heads", "head_dim"))
        if c.qk_norm:
            self.q_norm = ones((n, d), ("layers", "norm"))
            self.k_norm = ones((n, d), ("layers", "norm"))
        self.wo = w((n, h, d, e), ("layers", "heads", "head_dim", "embed"))
        if c.o_bias:
            self.bo = zeros((n, e), ("layers", "norm"))
        self.mlp_norm = ones((n, e), ("layers", "norm"))
        self.w_gate = w((n, e, f), ("layers", "embed", "mlp"))
        self.w_up = w((n, e, f), ("layers", "embed", "mlp"))
        self.w_down = w((n, f, e), ("layers", "mlp", "embed"))

    def arrays(self) -> dict[str, jax.Array]:
        """Raw parameter arrays by name (the xs of the layer scan)."""
        return {
            name: value.get_value()
            for name, value in vars(self).items()
            if isinstance(value, nnx.Variable)
        }

    def per_layer(self) -> list[dict[str, jax.Array]]:
        """The arrays sliced per layer: one {name: array without the layers axis} per layer."""
        arrays = self.arrays()
        n = next(iter(arrays.values())).shape[0]
        return [{name: a[i] for name, a in arrays.items()} for i in range(n)]


class Transformer(nnx.Module):
    """Qwen2 / Llama 3 / Qwen3 decoder; see the module docstring for the API."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: bool = False,
    ):
        c = config
        self.config = c
        self.dtype = dtype
        self.param_dtype = param_dtype
        # Rematerialise each layer in the backward pass (training on long sequences).
        self.remat = remat
        self.mesh: Mesh | None = None
        self.rules: tuple[tuple[str, Any], ...] | None = None
        normal = nnx.initializers.normal(0.02)
        self.embed = _param(
            normal(rngs.params(), (c.vocab_size, c.hidden_size), param_dtype), ("vocab", "embed")
        )
        self.layers = LayerStack(c, param_dtype, rngs)
        self.final_norm = _param(jnp.ones((c.hidden_size,), param_dtype), ("norm",), "ones")
        if not c.tie_word_embeddings:
            self.lm_head = _param(
                normal(rngs.params(), (c.hidden_size, c.vocab_size), param_dtype),
                ("embed", "vocab"),
            )

    # ------------------------------------------------------------------ sharding
    def set_mesh(self, mesh: Mesh | None, rules: Mapping[str, Any] | None = None) -> None:
        """Records the mesh so activations and caches get sharding constraints."""
        self.mesh = mesh
        self.rules = None if rules is None else tuple(sorted(dict(rules).items()))

    def _rules(self) -> Mapping[str, Any] | None:
        return None if self.rules is None else dict(self.rules)

    def _constrain(self, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
        return shd.with_logical_constraint(x, names, self.mesh, self._rules())

    def _embedding_to_activations(self, h: jax.Array) -> jax.Array:
        """The lookup's output [B, T, E] comes out as the table is split: width over the
        "embed" axes (fsdp), replicated over the rest. Its batch is first split over the batch
        axes the width does not use (a local slice), then width for batch over "embed" (an
        all-to-all). Asked for the activations' sharding in one step, XLA's partitioner could
        not do it on a data x fsdp x tensor mesh and replicated the whole array ("Involuntary
        full rematerialization", forward and backward). Gathering the table's width before the
        lookup avoids that too, but holds a full-width table and its gradient on each device:
        +3.7 GiB per device for the 7B config on a v5e-64."""
        rules = self._rules() or shd.DEFAULT_RULES
        embed, batch = shd.spec_axes(rules.get("embed")), shd.spec_axes(rules.get("batch"))
        outer = tuple(a for a in batch if a not in embed)
        outer_size = math.prod(self.mesh.shape[a] for a in outer) if self.mesh else 1
        # Only where there is a first step to take: on a mesh without data parallelism the
        # staged constraint is the lookup's own sharding, and XLA planned 0.13 GiB more per
        # device for the 7B config with it.
        if embed and outer != batch and outer_size > 1:
            staged = {**rules, "_batch_outer": outer or None}
            names = ("_batch_outer", "length", "embed")
            h = shd.with_logical_constraint(h, names, self.mesh, staged)
        return self._constrain(h, _ACT_AXES)

    # ------------------------------------------------------------------ public API
    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        *,
        return_hidden: bool = False,
    ) -> jax.Array:
        """Full causal forward without cache: [B, T] ids -> [B, T, V] float32 logits."""
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        idx = jnp.arange(t)
        mask = jnp.broadcast_to(idx[None, :, None] >= idx[None, None, :], (b, t, t))
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, :]
        hidden, _ = self._forward(input_ids, positions, mask, cache=None, write_mask=None)
        return hidden if return_hidden else self.logits_from_hidden(hidden)

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states [B, T, E] (after the final RMSNorm, before the LM head)."""
        return self(input_ids, positions, attention_mask, return_hidden=True)

    def lm_head_weight(self) -> jax.Array:
        """LM-head matrix [E, V] in param dtype (logits = hidden @ it)."""
        if self.config.tie_word_embeddings:
            return self.embed.get_value().T
        return self.lm_head.get_value()

    def logits_from_hidden(self, hidden: jax.Array, weight: jax.Array | None = None) -> jax.Array:
        """[..., E] hidden -> [..., V] float32 logits. ``weight``: optionally the LM-head matrix
        already cast to the compute dtype, taken once outside a decode loop (``decode_head``)."""
        w = (self.lm_head_weight() if weight is None else weight).astype(self.dtype)
        lead, e = hidden.shape[:-1], hidden.shape[-1]
        logits = jnp.matmul(
            hidden.astype(self.dtype).reshape(-1, e), w, preferred_element_type=jnp.float32
        )
        return logits.reshape(*lead, w.shape[-1])

    def layer_params(self) -> list[dict[str, jax.Array]]:
        """Each layer's parameter arrays (slices of the stacked ones), for ``decode``, in the
        compute dtype (every use casts a parameter to it, so the values are the same).

        Inside a decode loop, take them once before the loop and pass them to every step
        (``decode(..., layer_params=...)``): otherwise each step slices (copies) every layer's
        weights out of the stacked arrays and, with float32 master weights and a bfloat16
        compute dtype, converts them all again.
        """
        return [
            {name: a.astype(self.dtype) for name, a in layer.items()}
            for layer in self.layers.per_layer()
        ]

    def decode_head(self) -> jax.Array:
        """The LM-head matrix [E, V] in the compute dtype, for ``logits_from_hidden(h, it)`` in a
        decode loop (taken once before the loop, like ``layer_params``)."""
        return self.lm_head_weight().astype(self.dtype)

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """Zero KVCache with k, v [layers, batch, kv_heads, max_len, head_dim]."""
        c = self.config
        shape = (c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim)
        dtype = self.dtype if dtype is None else dtype
        k = self._constrain(jnp.zeros(shape, dtype), CACHE_LOGICAL_AXES)
        v = self._constrain(jnp.zeros(shape, dtype), CACHE_LOGICAL_AXES)
        return KVCache(k=k, v=v)

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        *,
        write_mask: jax.Array | None = None,
        return_hidden: bool = False,
        layer_params: list[dict[str, jax.Array]] | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Prefill or decode step with a KV cache (slot == position, right padding).

        Args:
          tokens: [B, T] token ids (T = prompt length for prefill, 1 for a step).
          positions: [B, T] int positions; also the cache slots written.
          cache: KVCache from ``init_cache`` (or a previous call / a row gather of one), stacked
            or per-layer (``cache.unstacked()``); the result has the same layout.
          write_mask: optional [B, T] bool; False tokens are not written to the cache.
          return_hidden: return final hidden states [B, T, E] instead of logits.
          layer_params: optional ``self.layer_params()``, taken once outside a decode loop (the
            layers then run as a Python loop over them, reading the weights in place).

        Returns:
          (logits [B, T, V] float32 or hidden [B, T, E], updated cache).
        """
        positions = positions.astype(jnp.int32)
        slots = jnp.arange(cache.max_len, dtype=jnp.int32)
        mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
        hidden, cache = self._forward(
            tokens,
            positions,
            mask,
            cache=cache,
            write_mask=write_mask,
            layer_params=layer_params,
        )
        out = hidden if return_hidden else self.logits_from_hidden(hidden)
        return out, cache

    # ------------------------------------------------------------------ internals
    def _forward(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        *,
        cache: KVCache | None,
        write_mask: jax.Array | None,
        layer_params: list[dict[str, jax.Array]] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        c = self.config
        dtype = self.dtype
        b, t = tokens.shape
        # mode="clip": an out-of-range pad id (e.g. -1) must not turn into NaN ("fill").
        h = jnp.take(self.embed.get_value(), tokens, axis=0, mode="clip").astype(dtype)
        h = self._embedding_to_activations(h)

        inv_freq = jnp.asarray(c.inv_freq())
        angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
        angles = jnp.concatenate([angles, angles], axis=-1)
        cos = jnp.cos(angles).astype(dtype)[:, :, None, :]  # [B, T, 1, D]
        sin = jnp.sin(angles).astype(dtype)[:, :, None, :]

        if cache is not None:
            slots = positions.astype(jnp.int32)
            if write_mask is not None:
                # Out-of-range slot + mode="drop" == no write.
                slots = jnp.where(write_mask.astype(bool), slots, cache.max_len)
            rows = jnp.arange(b, dtype=jnp.int32)[:, None]

        def layer(h, p, kv, i):
            """One decoder layer. kv: None (no cache), the stacked (k, v) [L, B, K, S, D] with
            this layer's index i, or this layer's own (k, v) [B, K, S, D] (i is None)."""
            # The attention projections and products: 2-D matmuls / the fast batched-matmul
            # attention when decoding with a cache; einsums without one (training), where they
            # cost the same on XLA:CPU and keep the rounding of a row independent of how many
            # rows share the call (micro-batch accumulation is tested to 1e-6).
            proj = _einsum if kv is None else _dense
            x = _rms_norm(h, p["attn_norm"], c.rms_norm_eps, dtype)
            q = proj(x, p["wq"], "bte,ehd->bthd", dtype)
            k = proj(x, p["wk"], "bte,ehd->bthd", dtype)
            v = proj(x, p["wv"], "bte,ehd->bthd", dtype)
            if c.qkv_bias:
                q = q + p["bq"].astype(dtype)
                k = k + p["bk"].astype(dtype)
                v = v + p["bv"].astype(dtype)
            if c.qk_norm:
                q = _rms_norm(q, p["q_norm"], c.rms_norm_eps, dtype)
                k = _rms_norm(k, p["k_norm"], c.rms_norm_eps, dtype)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if kv is None:
                attn = _attention_einsum(q, k, v, mask, c, dtype)  # [B, T, H, D]
            else:
                ck, cv = kv
                k, v = k.astype(ck.dtype), v.astype(cv.dtype)
                if i is None:  # this layer's own buffer: updated and read in place
                    ck = ck.at[rows, :, slots].set(k, mode="drop")
                    cv = cv.at[rows, :, slots].set(v, mode="drop")
                    keys, values = ck, cv
                else:
                    ck = ck.at[i, rows, :, slots].set(k, mode="drop")
                    cv = cv.at[i, rows, :, slots].set(v, mode="drop")
                    keys, values = ck[i], cv[i]
                keys, values = keys.astype(dtype), values.astype(dtype)  # [B, K, S, D]
                kv = (ck, cv)
                attn = _attention(q, keys, values, mask, c, dtype)  # [B, T, H, D]
            o = proj(attn, p["wo"], "bthd,hde->bte", dtype)
            if c.o_bias:
                o = o + p["bo"].astype(dtype)
            h = self._constrain(h + o, _ACT_AXES)
            x = _rms_norm(h, p["mlp_norm"], c.rms_norm_eps, dtype)
            gate = _dense(x, p["w_gate"], "bte,ef->btf", dtype)
            up = _dense(x, p["w_up"], "bte,ef->btf", dtype)
            h = h + _dense(jax.nn.silu(gate) * up, p["w_down"], "btf,fe->bte", dtype)
            return self._constrain(h, _ACT_AXES), kv

        if self.remat and cache is None:
            layer = jax.checkpoint(layer, prevent_cse=False, static_argnums=(3,))

        per_layer_cache = cache is not None and not cache.is_stacked
        if layer_params is not None or per_layer_cache or c.num_layers <= UNROLL_MAX_LAYERS:
            params = self.layer_params() if layer_params is None else layer_params
            if cache is None:
                for p in params:
                    h, _ = layer(h, p, None, None)
                new_cache = None
            elif per_layer_cache:
                ks, vs = list(cache.k), list(cache.v)
                for i, p in enumerate(params):
                    h, (ks[i], vs[i]) = layer(h, p, (ks[i], vs[i]), None)
                new_cache = KVCache(k=tuple(ks), v=tuple(vs))
            else:
                kv = (cache.k, cache.v)
                for i, p in enumerate(params):
                    h, kv = layer(h, p, kv, i)
                new_cache = KVCache(k=kv[0], v=kv[1])
        else:
            xs = (self.layers.arrays(), jnp.arange(c.num_layers))
            if cache is None:

                def body(h, xs):
                    return layer(h, xs[0], None, None)[0], None

                h, _ = jax.lax.scan(body, h, xs)
                new_cache = None
            else:

                def body(carry, xs):
                    h, kv = carry
                    return layer(h, xs[0], kv, xs[1]), None

                (h, kv), _ = jax.lax.scan(body, (h, (cache.k, cache.v)), xs)
                new_cache = KVCache(k=kv[0], v=kv[1])
        h = _rms_norm(h, self.final_norm.get_value(), c.rms_norm_eps, dtype)
        return h, new_cache


def _dense(x: jax.Array, w: jax.Array, spec: str, dtype: Any) -> jax.Array:
    """``einsum(spec, x, w)`` for a spec that contracts x's trailing axes with w's leading ones
    ("bte,ehd->bthd", "bthd,hde->bte", ...), computed as one 2-D matmul [rows, in] @ [in, out].

    On XLA:CPU a dot with several free dimensions per operand (and the transposed dots of its
    backward) is much slower than the plain matmul: 2-D, a layer's gradient took ~0.45x the time.
    """
    x_axes, w_axes = spec.split("->")[0].split(",")
    n = len(set(x_axes) & set(w_axes))
    if x_axes[len(x_axes) - n :] != w_axes[:n]:
        raise ValueError(f"_dense needs x's trailing axes contracted with w's leading: {spec}")
    lead, size = x.shape[: x.ndim - n], math.prod(x.shape[x.ndim - n :])
    y = x.reshape(-1, size) @ w.astype(dtype).reshape(size, -1)
    return y.reshape(*lead, *w.shape[n:])


def _einsum(x: jax.Array, w: jax.Array, spec: str, dtype: Any) -> jax.Array:
    return jnp.einsum(spec, x, w.astype(dtype))


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """RMSNorm over the last axis, statistics in float32 (as transformers does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * normed.astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _attention(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    c: ModelConfig,
    dtype: Any,
) -> jax.Array:
    """Grouped-query attention. q [B, T, H, D]; keys, values [B, K, S, D]; mask [B, T, S].

    Both products are plain batched matmuls with the batch dims (B, K) leading; the scores are
    computed as keys @ q^T ([B, K, S, T*G], softmax over S), which XLA:CPU runs about twice as
    fast as q @ keys^T (whose right operand is transposed).
    """
    b, t = q.shape[:2]
    kh, g, d = c.num_kv_heads, c.num_groups, c.head_dim
    s = keys.shape[2]
    qg = q.reshape(b, t, kh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, d)
    scores = jax.lax.dot_general(
        keys,
        qg,
        (((3,), (3,)), ((0, 1), (0, 1))),
        preferred_element_type=jnp.float32,
    ) * (d**-0.5)  # [B, K, S, T * G]
    if t == 1:
        # One decode position: move S minor ([B, K, G, S], a small copy) so the softmax reduces
        # the contiguous axis and probs @ values is a plain batched matmul. XLA:CPU's reduction
        # over the middle S axis and its dot with S in the middle were the slowest parts of a
        # decode step (a whole generate on the peer benchmark's tiny model: 28 -> 13 ms; a 0.5B
        # decode step at 256 rows: 1183 -> ~1000 ms; docs/SAMPLING.md). For the prefill (many
        # positions) the layout below stays faster.
        scores = jnp.swapaxes(scores, 2, 3)  # [B, K, G, S]
        scores = jnp.where(mask[:, :, None, :], scores, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jax.lax.dot_general(probs, values, (((3,), (2,)), ((0, 1), (0, 1))))  # [B, K, G, D]
        return out.reshape(b, 1, c.num_heads, d)
    scores = scores.reshape(b, kh, s, t, g)
    scores = jnp.where(mask.transpose(0, 2, 1)[:, None, :, :, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=2).astype(dtype).reshape(b, kh, s, t * g)
    out = jax.lax.dot_general(probs, values, (((2,), (2,)), ((0, 1), (0, 1))))  # [B, K, T*G, D]
    return out.reshape(b, kh, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, c.num_heads, d)


def _attention_einsum(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    c: ModelConfig,
    dtype: Any,
) -> jax.Array:
    """Attention without a cache (training): q [B, T, H, D]; k, v [B, T, K, D]; mask [B, T, T]."""
    b, t = q.shape[:2]
    qg = q.reshape(b, t, c.num_kv_heads, c.num_groups, c.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * (
        c.head_dim**-0.5
    )
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, c.num_heads, c.head_dim)


def init_model(
    config: ModelConfig,
    rngs: nnx.Rngs | int = 0,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: Mapping[str, Any] | None = None,
    remat: bool = False,
) -> Transformer:
    """Randomly initialised Transformer (normal(0.02) weights, unit norms, zero biases).

    With an integer seed the parameters come from one jitted, cached init program (with
    ``mesh``: straight into their target shardings, each device drawing only its shard); this
    compiles several times faster on CPU than the module's op-by-op nnx.Rngs init. An
    ``nnx.Rngs`` runs the module constructor eagerly instead (no mesh).
    """
    if not isinstance(rngs, int):
        if mesh is not None:
            raise ValueError("init_model with a mesh takes an integer seed (rngs=int)")
        return Transformer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat)
    rules_key = None if rules is None else tuple(sorted(dict(rules).items()))
    graphdef, init = _init_program(config, dtype, param_dtype, remat, mesh, rules_key)
    model = nnx.merge(graphdef, init(jax.random.key(rngs)))
    if mesh is not None:
        model.set_mesh(mesh, rules)
    return model


@functools.lru_cache(maxsize=16)
def _init_program(config, dtype, param_dtype, remat, mesh, rules_key):
    """(graphdef, jitted key -> state) for one model configuration and placement."""
    abstract = nnx.eval_shape(
        lambda: Transformer(
            config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, remat=remat
        )
    )
    graphdef, abstract_state = nnx.split(abstract)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    variables, treedef = jax.tree_util.tree_flatten(abstract_state, is_leaf=is_var)
    shardings = None
    if mesh is not None:
        rules = None if rules_key is None else dict(rules_key)
        shardings = shd.state_shardings(abstract_state, mesh, rules)

    def init(key: jax.Array):
        leaves = []
        for i, var in enumerate(variables):
            shape, dt = var.get_value().shape, var.get_value().dtype
            kind = var.get_metadata().get("init", "normal")
            if kind == "ones":
                value = jnp.ones(shape, dt)
            elif kind == "zeros":
                value = jnp.zeros(shape, dt)
            elif mesh is None:
                # Same values as the N-d draw below (threefry_partitionable counts linear
                # indices) but several times faster to compile on CPU.
                flat = jax.random.normal(jax.random.fold_in(key, i), (math.prod(shape),))
                value = (0.02 * flat).reshape(shape).astype(dt)
            else:
                # N-d draw so that each device generates only its own shard.
                value = (0.02 * jax.random.normal(jax.random.fold_in(key, i), shape)).astype(dt)
            leaves.append(var.replace(value))
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return graphdef, jax.jit(init, out_shardings=shardings)
