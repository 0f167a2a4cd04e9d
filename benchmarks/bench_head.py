"""LM-head log-probs + entropy, forward and backward: the library's hand-written gradient against
autodiff of the same forward.

`losses.token_logprobs_and_entropy` has its own VJP (`losses._head_stats`). The reference here is
what the library did before: the same chunked forward (logits = hidden @ lm_head / T,
log-softmax, entropy, gather of the target) differentiated by JAX, each chunk under
`jax.checkpoint`. Both are jitted and timed in interleaved rounds (median); every array is an
argument. The gradients are compared too (max abs difference).

    python benchmarks/bench_head.py                  # peer-sized and Qwen2.5-0.5B-sized heads
    python benchmarks/bench_head.py --shapes peer    # the small one only (seconds)
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax import losses

SHAPES = {
    # name: (rows, positions, hidden, vocab, chunk)
    "peer": (64, 32, 64, 512, 32),  # benchmarks/bench_peers.py's model and batch
    "qwen0.5b": (16, 32, 896, 151936, 32),  # Qwen2.5-0.5B's head, bench_train_step's batch
    "qwen0.5b_8k": (64, 128, 896, 151936, 32),  # the same head on 8,192 tokens (accelerators)
}


def autodiff_reference(hidden, lm_head, targets, temperature, chunk):
    """The chunked forward differentiated by JAX (checkpointed chunks), logp and entropy."""
    rows, length = targets.shape
    n = length // chunk
    h_c = jnp.moveaxis(hidden.reshape(rows, n, chunk, -1), 1, 0)
    t_c = jnp.moveaxis(targets.reshape(rows, n, chunk), 1, 0)

    @jax.checkpoint
    def body(h, t):
        z = jnp.einsum("rcd,dv->rcv", h, lm_head, preferred_element_type=jnp.float32)
        logp_all = jax.nn.log_softmax(z / temperature, axis=-1)
        entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
        return jnp.take_along_axis(logp_all, t[..., None], axis=-1)[..., 0], entropy

    logp, entropy = jax.lax.map(lambda a: body(*a), (h_c, t_c))
    return (jnp.moveaxis(x, 0, 1).reshape(rows, length) for x in (logp, entropy))


def library(hidden, lm_head, targets, temperature, chunk):
    s = losses.token_logprobs_and_entropy(hidden, lm_head, targets, temperature, chunk)
    return s.logp, s.entropy


def objective(fn, chunk):
    """jit(value_and_grad) w.r.t. hidden and lm_head of a weighted sum of logp and entropy."""

    def f(h, w, targets, coef):
        logp, entropy = fn(h, w, targets, 1.0, chunk)
        return jnp.sum(coef[0] * logp + coef[1] * entropy)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="peer,qwen0.5b", help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--chain",
        type=int,
        default=1,
        help="calls per timed sample, dispatched back to back (device time on an accelerator)",
    )
    args = ap.parse_args()
    load = os.getloadavg()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    for name in args.shapes.split(","):
        rows, length, d, v, chunk = SHAPES[name]
        k = jax.random.split(jax.random.key(0), 4)
        hidden = jax.random.normal(k[0], (rows, length, d)) / d**0.5
        lm_head = jax.random.normal(k[1], (d, v)) * 0.5
        targets = jax.random.randint(k[2], (rows, length), 0, v)
        coef = jax.random.normal(k[3], (2, rows, length))

        fns = {
            "library (hand-written VJP)": objective(library, chunk),
            "autodiff reference": objective(autodiff_reference, chunk),
        }
        inputs = (hidden, lm_head, targets, coef)
        outs = {n: jax.block_until_ready(f(*inputs)) for n, f in fns.items()}
        times = {n: [] for n in fns}
        for _ in range(args.repeats):
            for n, f in fns.items():
                t = time.perf_counter()
                jax.block_until_ready([f(*inputs) for _ in range(args.chain)])
                times[n].append((time.perf_counter() - t) / args.chain)
        (_, g_lib), (_, g_ref) = outs.values()
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(g_lib, g_ref, strict=True))
        print(
            f"\n== {name}: {rows} rows x {length} positions, hidden {d}, vocab {v}, chunk "
            f"{chunk}; forward + backward, median of {args.repeats} (x{args.chain} calls)"
        )
        med = {n: float(np.median(t)) * 1e3 for n, t in times.items()}
        base = med["autodiff reference"]
        for n, ms in med.items():
            print(f"  {n:28s} {ms:10.2f} ms  {base / ms:5.2f}x")
        print(f"  max |gradient difference|: {diff:.2e}")


if __name__ == "__main__":
    main()
