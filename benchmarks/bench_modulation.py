"""Cost of DynaMO's token-level modulation relative to the policy loss alone.

Times forward+backward (gradient w.r.t. the current log-probs and entropy, as in a train step)
of `modulate_advantages` + `policy_loss` against `policy_loss` alone, jitted, on
[rows, tokens] float32 inputs. Prints the median of several runs.

    python benchmarks/bench_modulation.py --rows 4096 --tokens 1024
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax import losses, modulation


def timeit_interleaved(fns: dict, *args, repeats: int) -> dict[str, float]:
    """Median wall time of each function, run in interleaved rounds so that background load
    affects all of them alike."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))  # compile + warm up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rows, length = args.rows, args.tokens

    keys = jax.random.split(jax.random.key(0), 5)
    logp = -jax.random.uniform(keys[0], (rows, length), minval=0.01, maxval=5.0)
    old_logp = logp + 0.1 * jax.random.normal(keys[1], (rows, length))
    entropy = jax.random.uniform(keys[2], (rows, length), maxval=3.0)
    adv = jax.random.normal(keys[3], (rows,))
    lengths = jax.random.randint(keys[4], (rows,), length // 4, length + 1)
    mask = (jnp.arange(length)[None] < lengths[:, None]).astype(jnp.float32)

    def loss_only(lp, ent):
        s, n, _ = losses.policy_loss(lp, old_logp, adv, mask)
        return losses.loss_value(s, n)

    def modulated(lp, ent, expectation="sequence", e_vocab=None):
        final, _ = modulation.modulate_advantages(
            adv, ent, lp, old_logp, mask, expectation=expectation, expected_pi_lambda=e_vocab
        )
        s, n, _ = losses.policy_loss(lp, old_logp, final, mask)
        return losses.loss_value(s, n)

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))  # noqa: E731
    e_vocab = 0.1 * entropy
    fns = {
        "loss": grad(loss_only),
        "sequence": grad(modulated),
        "vocab": grad(lambda lp, ent: modulated(lp, ent, "vocab", e_vocab)),
    }
    t = timeit_interleaved(fns, logp, entropy, repeats=args.repeats)
    t_loss, t_mod, t_voc = t["loss"], t["sequence"], t["vocab"]
    print(f"device: {jax.devices()[0].device_kind}, rows={rows}, tokens={length}")
    print(f"{'computation (fwd+bwd)':44s} {'ms':>9s} {'vs loss':>8s}")
    print(f"{'policy_loss alone':44s} {t_loss * 1e3:9.1f} {1.0:8.2f}")
    print(f"{'modulate_advantages + policy_loss (sequence)':44s} {t_mod * 1e3:9.1f} "
          f"{t_mod / t_loss:8.2f}")
    print(f"{'modulate_advantages + policy_loss (vocab)':44s} {t_voc * 1e3:9.1f} "
          f"{t_voc / t_loss:8.2f}")
    print(f"modulation overhead: {100 * (t_mod / t_loss - 1):.1f}% (sequence), "
          f"{100 * (t_voc / t_loss - 1):.1f}% (vocab)")


if __name__ == "__main__":
    main()
