"""TrainState and the pure, jitted DynaMO train step (SPEC sections 3-5).  [jit]

Two device functions, both shaped only by the bucket grid:

- `TrainStep.logprobs(params, batch)`: per-token log-probs and entropies of the response tokens
  (the behaviour policy's `old_logp` before the update, the reference policy's `ref_logp`).
- `TrainStep.update(state, batch, key)`: group advantages for ragged groups, a seeded shuffle of
  the rows, `num_minibatches` optimiser updates, each gradient-accumulated over micro-batches
  with the DynaMO modulation inside the loss, and AdamW with warm-up, weight decay and
  global-norm clipping. The state is donated.

A batch is a dict of arrays, all with the row axis first (R rows = a row bucket):

    input_ids      [R, P + M] int32  left-padded prompt, then the response (pad after its end)
    positions      [R, P + M] int32  prompt positions 0..len-1 end at index P - 1
    attention_mask [R, P + M] bool   False on prompt padding
    targets        [R, M] int32      response tokens (index P - 1 + t predicts targets[:, t])
    response_mask  [R, M] float32    1 on response tokens up to and including EOS
    old_logp       [R, M] float32    behaviour-policy log-probs (from `logprobs`)
    ref_logp       [R, M] float32    reference-policy log-probs (only when kl_coef > 0)
    rewards        [R] float32, group_ids [R] int32 in [0, num_groups), valid [R] bool

Left-padding the prompt makes the hidden state that predicts response token t sit at the same
index P - 1 + t in every row, so the LM head runs on a static [R, M] slice.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from dynamo_jax import advantages as adv_lib
from dynamo_jax import baselines, losses, modulation

Batch = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    """Everything the update changes, as one donated pytree."""

    step: jax.Array  # RL steps done (int32 scalar)
    params: Any  # nnx.State of the policy's parameters
    opt_state: Any
    ref_params: Any = None  # frozen reference policy (for the KL penalty), or None


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of the step (hashable; part of the compiled program)."""

    num_minibatches: int = 16
    micro_batch_rows: int = 64
    num_groups: int = 512
    temperature: float = 1.0
    logits_chunk_size: int = 128
    shuffle_rows: bool = True
    estimator: str = "grpo"
    advantage_eps: float = 1e-6
    # modulation (SPEC 2)
    comp: bool = True
    stab: bool = True
    alpha: float = 0.2
    lambda_min: float = 0.6
    gamma: float = 50.0
    tau: float = 0.99
    expectation: str = "sequence"
    scope: str = "micro_batch"
    # loss (SPEC 4)
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float = 10.0
    loss_agg: str = "token_mean"
    max_response_length: int | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    # SPEC 6 baselines (dynamo_jax/baselines.py)
    positive_weight: float = 0.1
    entropy_shaping_k: float = 0.0
    entropy_shaping_kappa: float = 2.0
    token_selection: str = "none"
    fork_fraction: float = 0.2
    cov_fraction: float = 2e-4
    clip_cov_low: float = 1.0
    clip_cov_high: float = 5.0
    kl_cov_coef: float = 1.0
    # The tokenizer's size where the model's vocabulary is padded past it: log-probs and
    # entropy over ids [0, vocab_limit), the distribution the sampler draws from. None: all.
    vocab_limit: int | None = None

    @classmethod
    def from_config(
        cls, config: Any, num_groups: int, vocab_limit: int | None = None
    ) -> StepSettings:
        c = config
        return cls(
            vocab_limit=vocab_limit,
            num_minibatches=c.train.num_minibatches,
            micro_batch_rows=c.train.micro_batch_rows,
            num_groups=num_groups,
            temperature=c.sampling.temperature,
            logits_chunk_size=c.loss.logits_chunk_size,
            shuffle_rows=c.train.shuffle_rows,
            estimator=c.advantage.estimator,
            advantage_eps=c.advantage.eps,
            comp=c.modulation.comp,
            stab=c.modulation.stab,
            alpha=c.modulation.alpha,
            lambda_min=c.modulation.lambda_min,
            gamma=c.modulation.gamma,
            tau=c.modulation.tau,
            expectation=c.modulation.expectation,
            scope=c.modulation.scope,
            eps_low=c.loss.eps_low,
            eps_high=c.loss.eps_high,
            dual_clip=c.loss.dual_clip,
            loss_agg=c.loss.loss_agg,
            max_response_length=c.sampling.max_new_tokens,
            kl_coef=c.loss.kl_coef,
            kl_estimator=c.loss.kl_estimator,
            entropy_coef=c.loss.entropy_coef,
            positive_weight=c.advantage.positive_weight,
            entropy_shaping_k=c.advantage.entropy_shaping_k,
            entropy_shaping_kappa=c.advantage.entropy_shaping_kappa,
            token_selection=c.loss.token_selection,
            fork_fraction=c.loss.fork_fraction,
            cov_fraction=c.loss.cov_fraction,
            clip_cov_low=c.loss.clip_cov_low,
            clip_cov_high=c.loss.clip_cov_high,
            kl_cov_coef=c.loss.kl_cov_coef,
        )


def make_optimizer(config: Any) -> optax.GradientTransformation:
    """AdamW with linear warm-up over `optim.warmup_steps` *RL steps*, then constant, after
    global-norm clipping (SPEC 5). One RL step makes `train.num_minibatches` optimiser updates;
    the warm-up counts RL steps (lr = peak * min(1, (rl_step + 1) / warmup_steps)), so the first
    step already learns."""
    o = config.optim
    per_step = config.train.num_minibatches
    warmup = max(int(o.warmup_steps), 0)
    peak = float(o.learning_rate)

    def schedule(count):
        rl_step = count // per_step
        if warmup == 0:
            return jnp.asarray(peak, jnp.float32)
        return peak * jnp.minimum(1.0, (rl_step + 1) / warmup).astype(jnp.float32)

    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip_norm),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, rest): only `params` is trained."""
    return nnx.split(model, nnx.Param, ...)


def init_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, with_reference: bool = False
) -> tuple[nnx.GraphDef, nnx.State, TrainState]:
    """A fresh TrainState: optimizer moments follow the parameters' shardings, scalars (step,
    optimizer counts) are replicated over the parameters' mesh, every leaf committed, so the
    first update compiles the same program as every later one."""
    graphdef, params, rest = split_model(model)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    params = jax.device_put(params, shardings)  # commit: same program before and after updates
    first = jax.tree.leaves(shardings)[0]
    if isinstance(first, jax.sharding.NamedSharding):
        scalar_sharding = jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
    else:
        scalar_sharding = jax.sharding.SingleDeviceSharding(list(first.device_set)[0])
    opt_state = jax.jit(tx.init)(params)
    opt_state = optax.tree_utils.tree_map_params(
        tx,
        lambda p, s: jax.device_put(p, s),
        opt_state,
        shardings,
        transform_non_params=lambda x: jax.device_put(x, scalar_sharding),
    )
    ref = jax.tree.map(jnp.copy, params) if with_reference else None
    step = jax.device_put(jnp.zeros((), jnp.int32), scalar_sharding)
    state = TrainState(step=step, params=params, opt_state=opt_state, ref_params=ref)
    return graphdef, rest, state


def state_shardings(state: TrainState) -> Any:
    """The sharding pytree of a state: pin it as the update's in/out shardings."""
    return jax.tree.map(lambda x: x.sharding, state)


def response_token_stats(
    graphdef: nnx.GraphDef,
    params: Any,
    rest: Any,
    batch: Mapping[str, jax.Array],
    temperature: float,
    logits_chunk_size: int,
    with_vocab: bool = False,
    vocab_limit: int | None = None,
) -> losses.TokenStats:
    """Log-probs / entropy (and the vocab expectation) of `batch["targets"]` for a batch in the
    train layout (`batch_from_rollouts`): [rows, M] each; over ids [0, vocab_limit) if given."""
    model = nnx.merge(graphdef, params, rest)
    hidden = model(
        batch["input_ids"], batch["positions"], batch["attention_mask"], return_hidden=True
    )
    resp_len = batch["targets"].shape[1]
    prompt_len = batch["input_ids"].shape[1] - resp_len
    # Index P - 1 + t predicts response token t; the last position predicts nothing we train.
    h = hidden[:, prompt_len - 1 : prompt_len - 1 + resp_len]
    return losses.token_logprobs_and_entropy(
        h,
        model.lm_head_weight(),
        batch["targets"],
        temperature,
        logits_chunk_size,
        with_vocab_expectation=with_vocab,
        vocab_limit=vocab_limit,
    )


def _response_token_stats(graphdef, params, rest, batch, s: StepSettings, with_vocab: bool):
    return response_token_stats(
        graphdef, params, rest, batch, s.temperature, s.logits_chunk_size, with_vocab, s.vocab_limit
    )


def _token_selection(
    s: StepSettings,
    stats: losses.TokenStats,
    micro: Batch,
    old_logp: jax.Array,
    advantages: jax.Array,
) -> dict[str, Any]:
    """The extra `policy_loss` arguments of the token-selection baselines (SPEC 6)."""
    mask = micro["response_mask"]
    if s.token_selection == "fork_tokens":
        return {"grad_mask": baselines.fork_token_mask(stats.entropy, mask, s.fork_fraction)}
    if s.token_selection == "clip_cov":
        detached = baselines.clip_cov_mask(
            stats.logp,
            old_logp,
            advantages,
            mask,
            jax.random.wrap_key_data(micro["micro_key"]),
            fraction=s.cov_fraction,
            cov_low=s.clip_cov_low,
            cov_high=s.clip_cov_high,
            eps_low=s.eps_low,
            eps_high=s.eps_high,
        )
        return {"grad_mask": 1.0 - detached}
    if s.token_selection == "kl_cov":
        selected = baselines.kl_cov_mask(stats.logp, advantages, mask, fraction=s.cov_fraction)
        return {"abs_kl_mask": selected, "abs_kl_coef": s.kl_cov_coef, "clip": False}
    return {}


def _count(mask: jax.Array, loss_agg: str) -> jax.Array:
    """The denominator `policy_loss` would return for these rows (known before the forward)."""
    if loss_agg == "token_mean":
        return jnp.sum(mask)
    return jnp.sum(jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)


_SUM_METRICS = (
    "tokens",
    "clip_low",
    "clip_high",
    "dual_clip",
    "ratio",
    "approx_kl",
    "kl",
    "entropy",
)
# The modulation's logged means, each a ratio of sums over the update's tokens: summed over
# micro-batches and mini-batches and divided once (an average of per-micro-batch means would
# weight micro-batches equally whatever their token counts, and count a micro-batch without A>0
# tokens as beta_comp 0 although beta_comp >= 1 there by definition).
_MODULATION_MEANS = {
    "beta_comp_pos_mean": ("beta_comp_pos_sum", "pos_tokens"),
    "beta_stab_mean": ("beta_stab_sum", "valid_tokens"),
    "damped_frac": ("damped_tokens", "valid_tokens"),
    "xi_mean": ("xi_sum", "valid_tokens"),
}
_MODULATION_SUMS = tuple(sorted({k for pair in _MODULATION_MEANS.values() for k in pair}))


def _modulation_means(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {
        name: jnp.sum(sums[num]) / jnp.maximum(jnp.sum(sums[den]), 1.0)
        for name, (num, den) in _MODULATION_MEANS.items()
    }


def _update(
    graphdef: nnx.GraphDef,
    rest: Any,
    tx: optax.GradientTransformation,
    s: StepSettings,
    state: TrainState,
    batch: Batch,
    key: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
    rows = batch["rewards"].shape[0]
    per_update = rows // s.num_minibatches
    n_micro = per_update // s.micro_batch_rows
    row_adv = adv_lib.group_advantages(
        batch["rewards"],
        batch["group_ids"],
        batch["valid"],
        s.num_groups,
        s.estimator,
        s.advantage_eps,
        s.positive_weight,
    )
    zero_var = adv_lib.zero_variance_fraction(
        batch["rewards"], batch["group_ids"], batch["valid"], s.num_groups
    )
    data = {k: v for k, v in batch.items() if k not in ("rewards", "group_ids", "valid")}
    data["advantages"] = row_adv
    data["response_mask"] = data["response_mask"] * batch["valid"][:, None]
    step_key = jax.random.fold_in(key, state.step)
    perm = jax.random.permutation(step_key, rows) if s.shuffle_rows else jnp.arange(rows)
    data = jax.tree.map(
        lambda x: x[perm].reshape(s.num_minibatches, n_micro, s.micro_batch_rows, *x.shape[1:]),
        data,
    )
    use_vocab = s.expectation == "vocab"
    if s.token_selection == "clip_cov":  # one key per micro-batch: its draw is random
        keys = jax.random.key_data(
            jax.random.split(jax.random.fold_in(step_key, 1), s.num_minibatches * n_micro)
        )
        data["micro_key"] = keys.reshape(s.num_minibatches, n_micro, *keys.shape[1:])

    def micro_forward(params, micro):
        stats = _response_token_stats(graphdef, params, rest, micro, s, use_vocab)
        return stats

    # Fully on-policy (one optimiser update per RL step, the batch has no "old_logp"): the
    # parameters the gradient is taken at ARE the behaviour policy, so the old log-probs are the
    # loss's own forward under stop_gradient (ratio 1): the same values a separate no-grad
    # pass would give, without that pass.
    on_policy = "old_logp" not in batch

    def old_logp_of(micro, stats):
        return jax.lax.stop_gradient(stats.logp) if on_policy else micro["old_logp"]

    def advantages_of(micro, stats):
        """The advantages modulation sees: Entropy Advantages (SPEC 6) shape them first. The
        mini_batch scope statistics must use the same ones as each micro-batch's loss."""
        if s.entropy_shaping_k > 0:
            return baselines.entropy_shaped_advantages(
                micro["advantages"], stats.entropy, s.entropy_shaping_k, s.entropy_shaping_kappa
            )
        return micro["advantages"]

    def micro_loss(params, micro, total, scope):
        stats = micro_forward(params, micro)
        old_logp = old_logp_of(micro, stats)
        advantages = advantages_of(micro, stats)
        final, mod_aux = modulation.modulate_advantages(
            advantages,
            stats.entropy,
            stats.logp,
            old_logp,
            micro["response_mask"],
            comp=s.comp,
            stab=s.stab,
            alpha=s.alpha,
            lambda_min=s.lambda_min,
            gamma=s.gamma,
            tau=s.tau,
            eps_low=s.eps_low,
            eps_high=s.eps_high,
            expectation=s.expectation,
            expected_pi_lambda=stats.expected_pi_lambda,
            scope=scope,
        )
        selection = _token_selection(s, stats, micro, old_logp, final)
        loss_sum, _, aux = losses.policy_loss(
            stats.logp,
            old_logp,
            final,
            micro["response_mask"],
            eps_low=s.eps_low,
            eps_high=s.eps_high,
            dual_clip=s.dual_clip,
            loss_agg=s.loss_agg,
            max_response_length=s.max_response_length,
            ref_logp=micro.get("ref_logp") if s.kl_coef > 0 else None,
            kl_coef=s.kl_coef,
            kl_estimator=s.kl_estimator,
            entropy=stats.entropy if s.entropy_coef > 0 else None,
            entropy_coef=s.entropy_coef,
            **selection,
        )
        aux = dict(aux)
        aux.setdefault(
            "entropy", jnp.sum(jax.lax.stop_gradient(stats.entropy) * micro["response_mask"])
        )
        aux.update({k: mod_aux[k] for k in _MODULATION_SUMS})
        aux["xi_max"] = mod_aux["xi_max"]
        aux["loss_sum"] = jax.lax.stop_gradient(loss_sum)
        return loss_sum / jnp.maximum(total, 1.0), aux

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def minibatch_update(carry, mb):
        params, opt_state = carry
        total = _count(mb["response_mask"], s.loss_agg)
        scope = None
        if s.scope == "mini_batch":
            # The parameters do not change within the update: one no-grad pass gives the exact
            # scope statistics every micro-batch sees.
            def stats_of(micro):
                st = micro_forward(jax.lax.stop_gradient(params), micro)
                return modulation.scope_statistics(
                    advantages_of(micro, st),
                    st.logp,
                    old_logp_of(micro, st),
                    st.entropy,
                    micro["response_mask"],
                    s.eps_low,
                    s.eps_high,
                    s.expectation,
                    st.expected_pi_lambda,
                )

            per_micro = jax.lax.map(stats_of, mb)
            scope = modulation.ScopeStats(
                h_max=jnp.max(per_micro.h_max),
                h_min=jnp.min(per_micro.h_min),
                xi_max=jnp.max(per_micro.xi_max),
            )

        def accumulate(grads, micro):
            g, aux = grad_fn(params, micro, total, scope)
            return jax.tree.map(jnp.add, grads, g), aux

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, auxs = jax.lax.scan(accumulate, zeros, mb)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {k: jnp.sum(auxs[k]) for k in auxs if k in _SUM_METRICS + _MODULATION_SUMS}
        metrics["xi_max"] = jnp.max(auxs["xi_max"])
        metrics["loss"] = jnp.sum(auxs["loss_sum"]) / jnp.maximum(total, 1.0)
        metrics["grad_norm"] = grad_norm
        return (params, opt_state), metrics

    (params, opt_state), per_mb = jax.lax.scan(
        minibatch_update, (state.params, state.opt_state), data
    )
    tokens = jnp.maximum(jnp.sum(per_mb["tokens"]), 1.0)
    metrics = {
        "loss": jnp.mean(per_mb["loss"]),
        "grad_norm": jnp.mean(per_mb["grad_norm"]),
        "grad_norm_max": jnp.max(per_mb["grad_norm"]),
        "entropy": jnp.sum(per_mb["entropy"]) / tokens,
        "clip_frac_low": jnp.sum(per_mb["clip_low"]) / tokens,
        "clip_frac_high": jnp.sum(per_mb["clip_high"]) / tokens,
        "dual_clip_frac": jnp.sum(per_mb["dual_clip"]) / tokens,
        "ratio_mean": jnp.sum(per_mb["ratio"]) / tokens,
        "approx_kl": jnp.sum(per_mb["approx_kl"]) / tokens,
        "xi_max": jnp.max(per_mb["xi_max"]),
        "zero_variance_frac": zero_var,
        "advantage_abs_mean": jnp.sum(jnp.abs(row_adv) * batch["valid"])
        / jnp.maximum(jnp.sum(batch["valid"]), 1),
        "train_tokens": jnp.sum(per_mb["tokens"]),
    }
    metrics.update(_modulation_means(per_mb))
    if "kl" in per_mb:
        metrics["kl"] = jnp.sum(per_mb["kl"]) / tokens
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


class TrainStep:
    """Owns the compiled step functions for one model graph, optimizer and settings.

    With a mesh, `state_shardings` (from `jax.tree.map(lambda x: x.sharding, state)`) pins the
    in/out shardings of the state so gradients and moments keep their parameters' layout, and
    batch arrays are sharded over the row axis.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        rest: Any,
        tx: optax.GradientTransformation,
        settings: StepSettings,
        state_shardings: Any = None,
        batch_sharding: Any = None,
    ):
        self.graphdef, self.rest, self.tx, self.settings = graphdef, rest, tx, settings
        self.batch_sharding = batch_sharding
        kw: dict[str, Any] = {}
        if state_shardings is not None:
            kw = dict(
                in_shardings=(state_shardings, batch_sharding, None),
                out_shardings=(state_shardings, None),
            )
        self._update = jax.jit(
            functools.partial(_update, graphdef, rest, tx, settings), donate_argnums=0, **kw
        )
        self._logprobs = jax.jit(self._logprobs_impl, static_argnames=("with_vocab",))

    def _logprobs_impl(self, params, batch, with_vocab=False):
        rows = batch["targets"].shape[0]
        chunk = self.settings.micro_batch_rows
        if rows <= chunk or rows % chunk:
            return _response_token_stats(
                self.graphdef, params, self.rest, batch, self.settings, with_vocab
            )
        # At most micro_batch_rows rows go through the model at once (what the update's
        # micro-batches hold): the activations of the whole rollout batch never exist together.
        # Chunk j holds rows j, j + n, j + 2n, ...: splitting [rows] as [chunk, n] keeps each
        # device's contiguous block of rows on that device, so no rows move between devices.
        n = rows // chunk

        def split(x):
            return jnp.swapaxes(x.reshape(chunk, n, *x.shape[1:]), 0, 1)

        def merge(y):
            return None if y is None else jnp.swapaxes(y, 0, 1).reshape(rows, *y.shape[2:])

        per_chunk = jax.lax.map(
            lambda b: _response_token_stats(
                self.graphdef, params, self.rest, b, self.settings, with_vocab
            ),
            jax.tree.map(split, batch),
        )
        return jax.tree.map(merge, per_chunk)

    def logprobs(self, params: Any, batch: Batch) -> losses.TokenStats:
        """Per-token log-probs/entropy of `batch["targets"]` under `params` (no gradient),
        computed `train.micro_batch_rows` rows at a time."""
        keys = ("input_ids", "positions", "attention_mask", "targets")
        return self._logprobs(params, self.put_batch({k: batch[k] for k in keys}))

    def update(self, state: TrainState, batch: Batch, key: jax.Array):
        """One RL update: returns (new_state, metrics). `state` is donated.

        `batch["old_logp"]` (the behaviour log-probs, from `logprobs`) may be left out when
        `num_minibatches == 1`: the update is then fully on-policy and takes them from its own
        forward pass (exactly the values at the parameters the gradient is taken at).
        """
        rows = batch["rewards"].shape[0]
        s = self.settings
        if "old_logp" not in batch and s.num_minibatches != 1:
            raise ValueError(
                f"batch has no 'old_logp': only a fully on-policy update "
                f"(train.num_minibatches = 1, got {s.num_minibatches}) may leave it out; "
                "compute it with TrainStep.logprobs(params, batch) before the update"
            )
        if s.kl_coef > 0 and "ref_logp" not in batch:
            raise ValueError(
                f"loss.kl_coef = {s.kl_coef} but the batch has no 'ref_logp': compute the "
                "reference log-probs with TrainStep.logprobs(ref_params, batch), or set "
                "loss.kl_coef = 0"
            )
        if rows % (s.num_minibatches * s.micro_batch_rows):
            raise ValueError(
                f"batch has {rows} rows, which train.num_minibatches * train.micro_batch_rows = "
                f"{s.num_minibatches} * {s.micro_batch_rows} must divide"
            )
        return self._update(state, self.put_batch(batch), key)

    def put_batch(self, batch: Batch) -> Batch:
        """Host arrays -> global device arrays split over the row axis. Every process passes the
        same full host batch (it is built from the same seeded data on every host) and keeps
        only its own shards: this is what makes the step work multi-host. Device arrays pass
        through unchanged."""
        if self.batch_sharding is None:
            return batch

        def put(x):
            if isinstance(x, jax.Array):
                return x
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self.batch_sharding, lambda i: x[i])

        return {k: put(v) for k, v in batch.items()}


def batch_from_rollouts(
    prompt_tokens: np.ndarray,
    prompt_lengths: np.ndarray,
    response_tokens: np.ndarray,
    response_mask: np.ndarray,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Host-side packing of right-padded prompts + responses into the left-padded train layout.

    Args:
      prompt_tokens: [R, P] right-padded prompt ids; prompt_lengths: [R].
      response_tokens: [R, M]; response_mask: [R, M].
    Returns input_ids, positions, attention_mask, targets, response_mask (see module docstring).
    """
    rows, plen = prompt_tokens.shape
    lengths = np.asarray(prompt_lengths, np.int64)
    if np.any(lengths < 1) or np.any(lengths > plen):
        bad = int(np.flatnonzero((lengths < 1) | (lengths > plen))[0])
        raise ValueError(f"row {bad}: prompt length {lengths[bad]} outside [1, {plen}]")
    shift = plen - lengths  # left padding per row
    idx = np.arange(plen)[None, :]
    src = idx - shift[:, None]  # source column in the right-padded layout
    prompt_left = np.where(
        src >= 0, np.take_along_axis(prompt_tokens, np.clip(src, 0, None), axis=1), pad_id
    )
    prompt_pos = np.maximum(src, 0)
    resp_len = response_tokens.shape[1]
    resp_pos = lengths[:, None] + np.arange(resp_len)[None, :]
    return {
        "input_ids": np.concatenate([prompt_left, response_tokens], axis=1).astype(np.int32),
        "positions": np.concatenate([prompt_pos, resp_pos], axis=1).astype(np.int32),
        "attention_mask": np.concatenate([src >= 0, np.ones((rows, resp_len), bool)], axis=1),
        "targets": np.asarray(response_tokens, np.int32),
        "response_mask": np.asarray(response_mask, np.float32),
    }
