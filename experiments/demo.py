"""A tour of DynaMO's two mechanisms on a simulated problem set (CPU, seconds).

    python -m experiments.demo [--prompts 64] [--steps 3] [--seed 0]

1. *How to allocate.* Prompts with hidden success rates p_i (some easy, some hard, some in
   between) are "trained" for a few steps under uniform allocation to build per-prompt history.
   The next step's budget B = N * n is then split three ways (uniform, DynaMO's variance-minimising
   allocator, the official rule), and for each we print the allocation and the two quantities it
   is meant to improve: the gradient-estimator variance sum_i sigma_i^2 / n_i with the *true*
   sigma_i^2 = p_i (1 - p_i), and the expected share of rollouts wasted in groups whose rewards
   are all equal (they carry no GRPO signal).
2. *How to learn.* A random batch of token log-probs and entropies is modulated, and the
   resulting beta_comp / beta_stab statistics are printed.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax import config as config_lib
from dynamo_jax.allocation import AllocationPolicy, PromptStats, allocate_rollouts
from dynamo_jax.modulation import modulate_advantages


def simulate_history(p: np.ndarray, steps: int, n: int, rng: np.random.Generator) -> PromptStats:
    stats = PromptStats()
    ids = [f"q{i:03d}" for i in range(len(p))]
    for _ in range(steps):
        counts = np.full(len(p), n)
        correct = rng.binomial(counts, p)
        stats.update(ids, counts, correct)
    return stats


def wasted_share(p: np.ndarray, n: np.ndarray) -> float:
    """Expected share of rollouts in groups whose rewards are all equal."""
    all_same = p**n + (1 - p) ** n
    return float(np.sum(n * all_same) / np.sum(n))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Tour of DynaMO's allocation and advantage modulation on simulated prompts.",
    )
    parser.add_argument("--prompts", type=int, default=64, help="prompts per step N")
    parser.add_argument("--steps", type=int, default=3, help="history steps before allocating")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = config_lib.get_default_config()
    cfg.prompts_per_step = args.prompts
    cfg.train.num_minibatches = 1
    cfg.train.micro_batch_rows = args.prompts * cfg.rollouts_per_prompt
    config_lib.validate(cfg)
    n, n_low, n_high = cfg.rollouts_per_prompt, cfg.allocation.n_low, cfg.allocation.n_high
    budget = args.prompts * n

    rng = np.random.default_rng(args.seed)
    # A problem set of mixed difficulty: a third near-unsolvable, a third near-solved, the rest
    # in between (where the learning signal is).
    kind = rng.integers(0, 3, args.prompts)
    p = np.where(
        kind == 0,
        rng.beta(1, 30, args.prompts),
        np.where(kind == 1, rng.beta(30, 1, args.prompts), rng.beta(2, 2, args.prompts)),
    )
    stats = simulate_history(p, args.steps, n, rng)
    ids = stats.ids
    k, G = stats.get(ids)

    policy = AllocationPolicy.from_config(cfg)
    weights = policy.weights(stats, ids)
    alloc = {
        "uniform": np.full(args.prompts, n),
        "variance": allocate_rollouts(weights, budget, n_low, n_high),
        "official": allocate_rollouts(None, budget, n_low, n_high, mode="official", stats=(k, G)),
    }

    print(
        f"N = {args.prompts} prompts, budget B = {budget} rollouts, bounds [{n_low}, {n_high}],"
        f" history: {args.steps} steps x {n} rollouts\n"
    )
    order = np.argsort(p)
    show = order[np.linspace(0, args.prompts - 1, 12).astype(int)]
    print(
        f"{'prompt':>7} {'true p':>7} {'k/G':>7} {'weight':>7} "
        + " ".join(f"{m:>9}" for m in alloc)
    )
    for i in show:
        print(
            f"{ids[i]:>7} {p[i]:7.3f} {k[i] / G[i]:7.3f} {weights[i]:7.4f} "
            + " ".join(f"{alloc[m][i]:9d}" for m in alloc)
        )

    sigma2 = p * (1 - p)
    base = float(np.sum(sigma2 / alloc["uniform"]))
    print(
        f"\n{'allocation':>10} {'sum n':>6} {'sum sigma^2/n':>14} {'vs uniform':>10} "
        f"{'wasted rollouts':>16}"
    )
    for name, nn in alloc.items():
        var = float(np.sum(sigma2 / nn))
        print(
            f"{name:>10} {int(nn.sum()):6d} {var:14.5f} {var / base:10.3f} "
            f"{100 * wasted_share(p, nn):15.1f}%"
        )

    # How to learn: modulate a random batch of token advantages.
    rows, length, vocab = 16, 32, 50
    keys = jax.random.split(jax.random.key(args.seed), 4)
    logits = 3.0 * jax.random.normal(keys[0], (rows, length, vocab))
    logp_all = jax.nn.log_softmax(logits)
    tokens = jax.random.categorical(keys[1], logits)
    logp = jnp.take_along_axis(logp_all, tokens[..., None], -1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
    old_logp = logp + 0.05 * jax.random.normal(keys[2], logp.shape)
    adv = jnp.where(jax.random.bernoulli(keys[3], 0.5, (rows,)), 1.0, -1.0)
    mask = jnp.ones((rows, length))
    final, aux = modulate_advantages(
        adv, entropy, logp, old_logp, mask, alpha=cfg.modulation.alpha, tau=cfg.modulation.tau
    )
    print(f"\nmodulation of a random batch [{rows} rows x {length} tokens]:")
    for key in ("beta_comp_pos_mean", "beta_stab_mean", "damped_frac", "xi_mean", "xi_max"):
        print(f"  {key:>20} = {float(aux[key]):.4f}")
    ratio = jnp.abs(final).sum() / jnp.abs(adv[:, None] * mask).sum()
    print(f"  {'|A_final| / |A|':>20} = {float(ratio):.4f}")


if __name__ == "__main__":
    main()
