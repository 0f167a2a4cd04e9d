"""RL step benchmark: where a DynaMO step's time goes, recompilations, FLOP/s vs this CPU's peak.

Two workloads, float32, one device:

  embedded  the `configs/arith_tiny.py` run (3 layers, d=128, 16 prompts x 8 rollouts = 128 rows,
            prompt bucket 16, 8 new tokens, 2 minibatches of 64 rows, modulation on), driven
            through the trainer's own step (`dynamo_jax.trainer._rl_step`: allocate -> sample ->
            verify -> stats -> old log-probs -> update). The policy is randomly initialised (the
            supervised warm start is skipped unless --model-path points at a cached one): the
            step's cost does not depend on the weights, only the response lengths do (a random
            model rarely emits EOS, so nearly every response runs the full 8 tokens).
  qwen0.5b  a random model with Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14/2 heads,
            intermediate 4864, vocab 151936, tied embeddings) at 4 prompts x 4 rollouts, 64 prompt
            tokens, 32 new tokens (no EOS: every response is 32 tokens), one minibatch of 16
            rows, modulation on, random +-1 rewards. The same pieces as the trainer, replicated:
            Sampler.generate, batch_from_rollouts, TrainStep.logprobs, TrainStep.update.

Printed per workload:
  - the step breakdown (median over the timed steps): data+allocation, sampling, verify (+ stats),
    old log-probs, update, total; sampled tokens/s (response tokens / step time, the trainer's
    `tokens_per_s`) and trained tokens/s (rows x (prompt + response) tokens / update time);
  - compilations after warm-up (`dynamo_jax.compilation.CompileCounter`), with the allocation
    changing every step (embedded: 50 steps of random group sizes n_i in [4, 16], sum 128);
  - FLOPs of the update and of the old-log-prob pass, three ways: (1) matmul FLOPs counted from
    the jaxpr (every dot_general, scan bodies multiplied by their length: forward, backward and
    rematerialised chunks, attention included); (2) XLA's cost analysis of the compiled update,
    `jit.lower(...).compile().cost_analysis()["flops"]`, which counts a loop body ONCE (the layer
    scan, the logit-chunk scan and the micro-batch scan), so it undercounts by about the number
    of layers; (3) the analytic 6 * params * tokens (2 * for the forward-only log-probs), with
    the LM head counted only on response tokens (that is all the step computes it on).
    FLOP/s fractions use (1) over the measured time, against a big float32 matmul measured here.

Examples:
  python benchmarks/bench_train_step.py                       # both workloads (~5 min, 2 cores)
  python benchmarks/bench_train_step.py --workloads embedded --steps 50
  python benchmarks/bench_train_step.py --workloads qwen0.5b --qwen-layers 12   # if too slow
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import importlib.util
import math
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax import compilation
from dynamo_jax import sharding as shd
from dynamo_jax import train_step as ts
from dynamo_jax.buckets import BucketSpec
from dynamo_jax.config import get_default_config
from dynamo_jax.models import ModelConfig, init_model
from dynamo_jax.sampling import Sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("data", "sampling", "verify", "logprobs", "update")


# ---------------------------------------------------------------------------- measurement tools
def matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    """Best FLOP/s of a float32 [n, n] @ [n, n] through JAX on this machine."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class _Peak:
    """Matmul peak, re-measured before each FLOP/s report (the machine is shared: a measurement
    taken while another job runs reads low); the best so far is the one used."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    def measure(self) -> float:
        self.samples.append(matmul_peak())
        return self.best

    @property
    def best(self) -> float:
        return max(self.samples)


PEAK = _Peak()


def _sub_jaxprs(value: Any):
    """Jaxprs held in an equation parameter (a Jaxpr, a ClosedJaxpr, or a tuple of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_matmul_flops(jaxpr: Any) -> tuple[float, int]:
    """(2 * MACs of every dot_general, number of while loops seen) for a (closed) jaxpr.

    scan bodies count `length` times, cond takes its most expensive branch, while loops count once
    (their trip count is data-dependent; the update has none, the decode loop does)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total, whiles = 0.0, 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in lc)
            continue
        subs = [
            _sub_jaxprs(v)
            for k, v in eqn.params.items()
            if k not in ("fwd_jaxpr_thunk", "bwd", "jvp_jaxpr_fun", "jvp_jaxpr_thunk")
        ]
        inner = [jaxpr_matmul_flops(j) for gen in subs for j in gen]
        if not inner:
            continue
        whiles += sum(w for _, w in inner) + (name == "while")
        if name == "cond":
            total += max(f for f, _ in inner)
        elif name == "scan":
            total += eqn.params["length"] * sum(f for f, _ in inner)
        elif name == "while":
            total += sum(f for f, _ in inner)
        else:
            total += sum(f for f, _ in inner)
    return total, whiles


def xla_cost_flops(jitted: Any, *args: Any) -> float:
    """`flops` from XLA's cost analysis of the compiled program (loop bodies counted once)."""
    cost = jitted.lower(*args).compile().cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def matmul_params(cfg: ModelConfig) -> tuple[int, int]:
    """(matmul weights in the layers, LM-head weights)."""
    e, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * (e * (q + 2 * kv) + q * e + 3 * e * f), e * cfg.vocab_size


def analytic_flops(cfg: ModelConfig, rows: int, prompt_len: int, new_tokens: int) -> dict:
    """6 * N * T for the update, 2 * N * T for the log-prob pass; the body sees every position,
    the LM head only the response positions. Attention score FLOPs are not included."""
    body, head = matmul_params(cfg)
    t_all, t_resp = rows * (prompt_len + new_tokens), rows * new_tokens
    fwd = 2.0 * (body * t_all + head * t_resp)
    # Decode: one token per row per step through the body and the head; prefill: the prompts.
    return {"update": 3 * fwd, "logprobs": fwd, "sampling_fwd": 2.0 * (body + head) * t_resp}


def median_phases(records: list[dict[str, float]]) -> dict[str, float]:
    out = {k: float(np.median([r[k] for r in records])) for k in records[0]}
    return out


def print_breakdown(name: str, med: dict[str, float], resp_tokens: float, train_tokens: int):
    total = sum(med[p] for p in PHASES)
    parts = " | ".join(f"{p} {med[p] * 1e3:.1f} ms ({med[p] / total:.0%})" for p in PHASES)
    print(f"  [{name}] step {total * 1e3:.1f} ms: {parts}")
    print(
        f"  [{name}] sampled tokens/s {resp_tokens / total:,.0f} (response tokens / step); "
        f"trained tokens/s {train_tokens / med['update']:,.0f} (rows x (P + M) / update)"
    )
    return total


def print_flops(
    name: str,
    jx: dict,
    xla: float,
    ana: dict,
    med: dict,
    total: float,
    peak: float,
    old_logp_pass: bool = True,
) -> None:
    up, lp = jx["update"], jx["logprobs"]
    print(
        f"  [{name}] update FLOPs: jaxpr matmul count {up / 1e9:.2f} G | XLA cost_analysis "
        f"{xla / 1e9:.2f} G (loop bodies once) | analytic 6NT {ana['update'] / 1e9:.2f} G"
    )
    print(
        f"  [{name}] old-log-prob FLOPs: jaxpr {lp / 1e9:.2f} G | analytic 2NT "
        f"{ana['logprobs'] / 1e9:.2f} G; sampling (analytic 2NT, decode) "
        f"{ana['sampling_fwd'] / 1e9:.2f} G"
    )
    up_rate = up / med["update"]
    if old_logp_pass:
        lp_rate = lp / med["logprobs"]
        lp_text = f"old log-probs {lp_rate / 1e9:.1f} G/s = {lp_rate / peak:.1%}"
    else:
        lp, lp_text = 0.0, "old log-probs not run (taken from the update)"
    all_rate = (up + lp + ana["sampling_fwd"]) / total
    print(
        f"  [{name}] FLOP/s: update {up_rate / 1e9:.1f} G/s = {up_rate / peak:.1%} of peak | "
        f"{lp_text} | whole step {all_rate / 1e9:.1f} G/s = {all_rate / peak:.1%}"
    )


# ---------------------------------------------------------------------------- embedded run
class RandomAllocation:
    """Stands in for AllocationPolicy: random group sizes in [n_low, n_high] summing to B, so
    every step has a new allocation (what must not recompile)."""

    def __init__(self, n_low: int, n_high: int, per_prompt: int, seed: int = 0):
        self.n_low, self.n_high, self.per_prompt = n_low, n_high, per_prompt
        self.rng = np.random.default_rng(seed)
        self.seen: set[tuple[int, ...]] = set()

    def allocate(self, stats: Any, ids: list, epoch: int | None = None) -> np.ndarray:
        del stats, epoch
        n = np.full(len(ids), self.n_low, np.int64)
        extra = len(ids) * self.per_prompt - n.sum()
        while extra > 0:  # hand out the rest one unit at a time to random non-full prompts
            i = self.rng.integers(len(ids))
            if n[i] < self.n_high:
                n[i] += 1
                extra -= 1
        self.seen.add(tuple(n.tolist()))
        return n


def _load_config(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run_embedded(args: argparse.Namespace) -> None:
    from dynamo_jax import trainer

    config = _load_config(args.config)
    config.sft.steps = 0  # timing only: skip the supervised warm start
    if args.model_path:
        config.model.path = args.model_path
    workdir = tempfile.mkdtemp(prefix="bench_train_step_")  # the task's tokenizer only
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    mesh = shd.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor)
    compilation.install()
    task = trainer.build_task(config, workdir)
    model, _ = trainer.build_model(config, task, workdir, mesh, print)
    n_prompts = config.prompts_per_step
    budget = n_prompts * config.rollouts_per_prompt
    mcfg = model.config
    parts = trainer.build_rl_parts(config, model, task, mesh)  # what trainer.train builds
    del model
    sampler, step_fn, state, settings = (
        parts.sampler,
        parts.step_fn,
        parts.state,
        parts.step_fn.settings,
    )
    stats, policy, iterator, index_of = parts.stats, parts.policy, parts.iterator, parts.index_of
    key = jax.random.key(config.seed)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(
        f"\n== embedded (configs/arith_tiny.py): {mcfg.num_layers} layers, d={mcfg.hidden_size}, "
        f"vocab {mcfg.vocab_size}, {n_params / 1e6:.2f}M params; {n_prompts} prompts x "
        f"{config.rollouts_per_prompt} = {budget} rows, prompt bucket "
        f"{config.buckets.prompt_len[0]}, {config.sampling.max_new_tokens} new tokens, "
        f"{settings.num_minibatches} minibatches x {settings.micro_batch_rows} rows, modulation "
        f"comp={settings.comp} stab={settings.stab}, "
        f"{'cached warm start' if args.model_path else 'random init'}"
    )

    def one(step: int, pol: Any) -> tuple[dict[str, float], float]:
        nonlocal state
        state, m, _ = trainer._rl_step(
            config, step, key, state, step_fn, sampler, task, stats, pol, iterator, index_of
        )
        rec = {p: m[f"time_{p}_s"] for p in PHASES}
        return rec, m["response_length_mean"] * budget

    t = time.perf_counter()
    counts = []
    for step in range(args.warmup):
        with compilation.CompileCounter() as warm:
            one(step, policy)
        counts.append(warm.count)
    print(
        f"  warm-up: {args.warmup} steps (trainer's variance policy) in "
        f"{time.perf_counter() - t:.1f}s, compilations per step {counts}"
    )
    rand = RandomAllocation(config.allocation.n_low, config.allocation.n_high, 8, seed=1)
    recs, toks = [], []
    with compilation.CompileCounter() as after:
        for step in range(args.warmup, args.warmup + args.steps):
            rec, tok = one(step, rand)
            recs.append(rec)
            toks.append(tok)
    print(
        f"  compilations after warm-up over {args.steps} steps with changing allocations "
        f"({len(rand.seen)} distinct, n_i in [{rand.n_low}, {rand.n_high}]): {after.count}"
        + (f" {after.by_function}" if after.count else " (target 0)")
    )
    med = median_phases(recs)
    rows, plen, m_new = budget, config.buckets.prompt_len[0], config.sampling.max_new_tokens
    total = print_breakdown("embedded", med, float(np.median(toks)), rows * (plen + m_new))
    _flops_report(
        "embedded",
        args,
        step_fn,
        state,
        sampler,
        mcfg,
        med,
        total,
        old_logp_pass=step_fn.settings.num_minibatches > 1,
    )


def _flops_report(
    name, args, step_fn, state, sampler, mcfg, med, total, old_logp_pass=True
) -> None:
    """Builds one batch of the workload's shape and counts the FLOPs of its programs."""
    s = step_fn.settings
    rows = int(sampler.spec.row_buckets[0])
    plen, m_new = sampler.spec.prompt_len_buckets[0], sampler.spec.max_new_tokens
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(1, mcfg.vocab_size, (rows, plen + m_new)).astype(np.int32),
        "positions": np.broadcast_to(np.arange(plen + m_new, dtype=np.int32), (rows, plen + m_new)),
        "attention_mask": np.ones((rows, plen + m_new), bool),
        "targets": rng.integers(1, mcfg.vocab_size, (rows, m_new)).astype(np.int32),
        "response_mask": np.ones((rows, m_new), np.float32),
        "old_logp": np.full((rows, m_new), -3.0, np.float32),
        "rewards": rng.choice([-1.0, 1.0], rows).astype(np.float32),
        "group_ids": (np.arange(rows) % s.num_groups).astype(np.int32),
        "valid": np.ones(rows, bool),
    }
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    key = jax.random.key(0)
    update_fn = functools.partial(
        ts._update, step_fn.graphdef, step_fn.rest, step_fn.tx, step_fn.settings
    )
    lp_keys = ("input_ids", "positions", "attention_mask", "targets")
    jx = {
        "update": jaxpr_matmul_flops(jax.make_jaxpr(update_fn)(state, batch, key))[0],
        "logprobs": jaxpr_matmul_flops(
            jax.make_jaxpr(step_fn._logprobs_impl)(state.params, {k: batch[k] for k in lp_keys})
        )[0],
    }
    xla = xla_cost_flops(step_fn._update, state, batch, key) if args.xla_cost else float("nan")
    ana = analytic_flops(mcfg, rows, plen, m_new)
    peak = PEAK.measure()
    print_flops(name, jx, xla, ana, med, total, peak, old_logp_pass)


# ---------------------------------------------------------------------------- qwen-shaped run
def qwen_config(layers: int, vocab: int) -> ModelConfig:
    return ModelConfig(
        model_type="qwen2",
        vocab_size=vocab,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=layers,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rope_theta=1e6,
        tie_word_embeddings=True,
        qkv_bias=True,
    )


@dataclasses.dataclass
class _Shape:
    prompts: int
    group: int
    prompt_len: int
    new_tokens: int


def run_qwen(args: argparse.Namespace) -> None:
    shape = _Shape(args.qwen_prompts, args.qwen_group, args.qwen_prompt_len, args.qwen_new_tokens)
    rows = shape.prompts * shape.group
    mcfg = qwen_config(args.qwen_layers, args.qwen_vocab)
    config = get_default_config()
    config.prompts_per_step = shape.prompts
    config.rollouts_per_prompt = shape.group
    config.sampling.max_new_tokens = shape.new_tokens
    config.train.num_minibatches = 1
    config.train.micro_batch_rows = args.qwen_micro_rows or rows
    config.loss.logits_chunk_size = args.qwen_logits_chunk or shape.new_tokens
    config.model.remat = args.qwen_remat
    config.model.dtype = args.qwen_dtype
    config.optim.learning_rate = 1e-6
    compilation.install()
    t = time.perf_counter()
    # On a one-device mesh, as the trainer builds it (the sampler takes the model's mesh).
    mesh = shd.make_mesh(data=-1, fsdp=1, tensor=1)
    model = init_model(
        mcfg, 0, mesh=mesh, remat=args.qwen_remat, dtype=getattr(jnp, args.qwen_dtype)
    )
    tx = ts.make_optimizer(config)
    graphdef, rest, state = ts.init_train_state(model, tx)
    settings = ts.StepSettings.from_config(config, num_groups=shape.prompts)
    step_fn = ts.TrainStep(
        graphdef, rest, tx, settings, ts.state_shardings(state), shd.batch_sharding(mesh)
    )
    spec = BucketSpec(
        prompt_len_buckets=(shape.prompt_len,),
        row_buckets=(rows,),
        prompt_count_buckets=(shape.prompts,),
        max_new_tokens=shape.new_tokens,
    )
    sampler = Sampler(model, eos_ids=(), pad_id=0, spec=spec)
    del model
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(
        f"\n== qwen0.5b-shaped (random): {mcfg.num_layers} layers, d={mcfg.hidden_size}, "
        f"vocab {mcfg.vocab_size}, {n_params / 1e6:.0f}M params float32; {shape.prompts} prompts "
        f"x {shape.group} = {rows} rows, {shape.prompt_len} prompt tokens, {shape.new_tokens} new "
        f"tokens (no EOS), 1 minibatch of {settings.micro_batch_rows}-row micro-batches, "
        f"compute {args.qwen_dtype}, remat {args.qwen_remat}, modulation comp={settings.comp} "
        f"stab={settings.stab}; old log-probs "
        f"{'in a separate pass' if args.qwen_old_logp_pass else 'from the update (as the trainer)'}"
        f"; init {time.perf_counter() - t:.1f}s"
    )
    rng = np.random.default_rng(0)
    key = jax.random.key(0)

    def one(step: int) -> dict[str, float]:
        nonlocal state
        t0 = time.perf_counter()
        prompts = [
            rng.integers(1, mcfg.vocab_size, shape.prompt_len).tolist()
            for _ in range(shape.prompts)
        ]
        ids = np.arange(step * shape.prompts, (step + 1) * shape.prompts)
        n = np.full(shape.prompts, shape.group, np.int64)
        t1 = time.perf_counter()
        out = sampler.generate(state.params, prompts, ids, n, jax.random.fold_in(key, step))
        t2 = time.perf_counter()
        rewards = rng.choice([-1.0, 1.0], rows).astype(np.float32) * out.valid  # "verify"
        t3 = time.perf_counter()
        batch = ts.batch_from_rollouts(
            out.prompt_tokens, out.prompt_lengths, out.response_tokens, out.response_mask, 0
        )
        batch.update(rewards=rewards, group_ids=out.group_id.astype(np.int32), valid=out.valid)
        if args.qwen_old_logp_pass:  # the trainer skips it with one minibatch (on-policy)
            batch["old_logp"] = step_fn.logprobs(state.params, batch).logp
            jax.block_until_ready(batch["old_logp"])
        t4 = time.perf_counter()
        state, m = step_fn.update(state, batch, jax.random.fold_in(key, 10**6 + step))
        jax.device_get(m)
        t5 = time.perf_counter()
        times = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
        return dict(zip(PHASES, times, strict=True))

    t = time.perf_counter()
    with compilation.CompileCounter() as warm:
        first = one(0)
    print(
        f"  first step (compiles) {time.perf_counter() - t:.1f}s: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in first.items())
        + f"; {warm.count} compilations"
    )
    recs = []
    for step in range(1, 1 + args.qwen_steps):
        with compilation.CompileCounter() as after:
            recs.append(one(step))
        print(
            f"  step {step}: {sum(recs[-1].values()):.1f}s, compilations {after.count}"
            + (f" {after.by_function}" if after.count else "")
        )
    med = median_phases(recs)
    total = print_breakdown(
        "qwen0.5b", med, rows * shape.new_tokens, rows * (shape.prompt_len + shape.new_tokens)
    )
    _flops_report(
        "qwen0.5b",
        args,
        step_fn,
        state,
        sampler,
        mcfg,
        med,
        total,
        old_logp_pass=args.qwen_old_logp_pass,
    )


# ---------------------------------------------------------------------------- backward probe
def _dense_2d(x: jax.Array, w: jax.Array, spec: str, dtype: Any) -> jax.Array:
    """transformer._dense as plain 2-D matmuls over flattened [B * T] rows (experiment)."""
    w = w.astype(dtype)
    lead = x.shape[:2]
    if spec in ("bte,ef->btf", "btf,fe->bte", "bte,ehd->bthd", "bthd,hde->bte"):
        n_in = x.shape[-1] if spec[:4] != "bthd" else x.shape[-2] * x.shape[-1]
        out_shape = w.shape[1:] if spec == "bte,ehd->bthd" else w.shape[-1:]
        w2 = w.reshape(n_in, -1)
        return (x.reshape(lead[0] * lead[1], n_in) @ w2).reshape(*lead, *out_shape)
    return jnp.einsum(spec, x, w)


def backward_probe(repeats: int = 5) -> None:
    """Bare model: forward vs gradient of sum(hidden^2), as the model is written, with its dense
    layers as 2-D matmuls, and additionally with the layer scan unrolled. An experiment pointing at
    where the update's time goes on XLA:CPU; the library is not changed."""
    from flax import nnx

    from dynamo_jax.models import transformer as tr

    shapes = {
        "embedded (3 x d128, 128 rows x 24)": (
            dict(vocab_size=18, hidden_size=128, intermediate_size=384, num_layers=3),
            128,
            24,
        ),
        "peer tiny (2 x d64, 64 rows x 48)": (
            dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, head_dim=16),
            64,
            48,
        ),
    }

    def timed(f, *a):
        jax.block_until_ready(f(*a))
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - t)
        return float(np.median(ts)) * 1e3

    print("\n== backward probe: bare model forward vs grad (ms, median)")
    orig_dense, orig_scan = tr._dense, jax.lax.scan
    for name, (kw, rows, length) in shapes.items():
        kw = dict(dict(num_heads=4, num_kv_heads=2, head_dim=32), **kw)
        cfg = ModelConfig(model_type="qwen2", tie_word_embeddings=True, **kw)
        ids = jnp.asarray(
            np.random.default_rng(0).integers(1, cfg.vocab_size, (rows, length)), jnp.int32
        )
        cells = []
        for variant in ("as written", "2-D dense", "2-D dense + unrolled layer scan"):
            try:
                if variant != "as written":
                    tr._dense = _dense_2d
                if variant.endswith("unrolled layer scan"):
                    jax.lax.scan = functools.partial(orig_scan, unroll=True)
                graphdef, params, rest = nnx.split(init_model(cfg, 0), nnx.Param, ...)

                def fwd(p, ids, graphdef=graphdef, rest=rest):
                    return nnx.merge(graphdef, p, rest)(ids, return_hidden=True)

                grad = jax.grad(lambda p, ids, fwd=fwd: jnp.sum(fwd(p, ids) ** 2))
                f_ms, g_ms = timed(jax.jit(fwd), params, ids), timed(jax.jit(grad), params, ids)
            finally:
                tr._dense, jax.lax.scan = orig_dense, orig_scan
            cells.append(f"{variant}: fwd {f_ms:.1f}, grad {g_ms:.1f} ({g_ms / f_ms:.1f}x)")
        print(f"  {name}: " + " | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--workloads", default="embedded,qwen0.5b,probe", help="comma list of the three"
    )
    ap.add_argument("--warmup", type=int, default=3, help="embedded: warm-up steps")
    ap.add_argument("--steps", type=int, default=50, help="embedded: counted/timed steps")
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "arith_tiny.py"))
    ap.add_argument("--model-path", default="", help="embedded: cached SFT model folder")
    ap.add_argument("--qwen-steps", type=int, default=2, help="qwen: timed steps after the first")
    ap.add_argument("--qwen-layers", type=int, default=24)
    ap.add_argument("--qwen-vocab", type=int, default=151936)
    ap.add_argument("--qwen-prompts", type=int, default=4)
    ap.add_argument("--qwen-group", type=int, default=4)
    ap.add_argument("--qwen-prompt-len", type=int, default=64)
    ap.add_argument("--qwen-new-tokens", type=int, default=32)
    ap.add_argument(
        "--qwen-micro-rows", type=int, default=0, help="qwen: rows per micro-batch (0: all rows)"
    )
    ap.add_argument(
        "--qwen-logits-chunk", type=int, default=0, help="qwen: loss.logits_chunk_size (0: all)"
    )
    ap.add_argument("--qwen-remat", action="store_true", help="qwen: model.remat = True")
    ap.add_argument(
        "--qwen-dtype", default="float32", choices=("float32", "bfloat16"), help="qwen: compute"
    )
    ap.add_argument(
        "--qwen-old-logp-pass",
        action="store_true",
        help="qwen: time the separate old-log-prob pass (the trainer runs it only with several "
        "minibatches; by default the update takes them from its own forward)",
    )
    ap.add_argument(
        "--no-xla-cost", dest="xla_cost", action="store_false", help="skip XLA cost analysis"
    )
    args = ap.parse_args()

    peak = PEAK.measure()
    load = os.getloadavg()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); "
        f"float32 4096^3 matmul {peak / 1e9:.1f} GFLOP/s; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    for w in args.workloads.split(","):
        {"embedded": run_embedded, "qwen0.5b": run_qwen, "probe": lambda a: backward_probe()}[w](
            args
        )
    load = os.getloadavg()
    print(
        f"\nmatmul peak measurements (GFLOP/s): {[round(p / 1e9) for p in PEAK.samples]}, "
        f"the best ({PEAK.best / 1e9:.0f}) is the peak used above; load average at the end: "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


if __name__ == "__main__":
    main()
