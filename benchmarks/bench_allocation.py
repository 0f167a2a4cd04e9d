"""Time `allocate_rollouts` (variance and official modes) on realistic prompt statistics.

Usage (from the repo root, with the package installed or PYTHONPATH=.):
    python benchmarks/bench_allocation.py [--sizes 1000 10000 100000] [--repeats 7]

Statistics mimic a run in progress: 20% unexplored prompts (G < 4), 25% solved always or never
(P = 0, weight 0), the rest with 4..64 rollouts seen and a random success rate. B = 16 N,
bounds 8..24 (the SPEC 5 defaults). Prints the median wall time of `repeats` calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from dynamo_jax.allocation import allocate_rollouts, allocation_objective, allocation_weights


def realistic_stats(N: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    G = rng.integers(4, 65, N).astype(np.float64)
    k = rng.binomial(G.astype(np.int64), rng.random(N)).astype(np.float64)
    kind = rng.random(N)
    unexplored = kind < 0.2
    G[unexplored] = rng.integers(0, 4, int(unexplored.sum()))
    k[unexplored] = 0.0
    solved = (kind >= 0.2) & (kind < 0.325)
    k[solved] = G[solved]
    never = (kind >= 0.325) & (kind < 0.45)
    k[never] = 0.0
    return k, G


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    n_low, n_high, per_prompt = 8, 24, 16
    header = (
        f"{'N':>8} | {'variance ms':>11} | {'official ms':>11} | {'uniform obj / variance obj':>26}"
    )
    print(header)
    print("-" * len(header))
    for N in args.sizes:
        k, G = realistic_stats(N)
        w = allocation_weights(k, G)
        B = per_prompt * N
        t_var = median_time(lambda w=w, B=B: allocate_rollouts(w, B, n_low, n_high), args.repeats)
        t_off = median_time(
            lambda k=k, G=G, B=B: allocate_rollouts(
                None, B, n_low, n_high, mode="official", stats=(k, G)
            ),
            args.repeats,
        )
        n_var = allocate_rollouts(w, B, n_low, n_high)
        ratio = allocation_objective(w, np.full(N, per_prompt)) / allocation_objective(w, n_var)
        print(f"{N:>8} | {t_var * 1e3:>11.2f} | {t_off * 1e3:>11.2f} | {ratio:>26.3f}")


if __name__ == "__main__":
    main()
