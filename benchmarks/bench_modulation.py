"""Cost of DynaMO's token-level modulation relative to the policy loss alone.

Times forward+backward (gradient w.r.t. the current log-probs and entropy, as in a train step)
of `modulate_advantages` + `policy_loss` against `policy_loss` alone, jitted, on
[rows, tokens] float32 inputs. Prints the median of several runs.

    python benchmarks/bench_modulation.py --rows 4096 --tokens 1024
    python benchmarks/bench_modulation.py --step     # also: a whole train-step update, on vs off
    python benchmarks/bench_modulation.py --profile --hlo   # device time from a profiler trace
                                                            # and XLA's kernels (on a GPU)
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax import losses, modulation


def timeit_interleaved(fns: dict, *args, repeats: int, chain: int = 1) -> dict[str, float]:
    """Median time per call of each function, run in interleaved rounds so that background load
    affects all of them alike. With chain > 1 each sample is `chain` calls dispatched back to
    back and waited for once: on an accelerator that measures the device's time per call rather
    than the host's dispatch latency (which dominates sub-millisecond kernels)."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))  # compile + warm up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = [fn(*args) for _ in range(chain)]
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / chain)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--chain",
        type=int,
        default=1,
        help="calls per timed sample, dispatched back to back (use ~50 on a GPU, where one "
        "call of the bare comparison is shorter than its dispatch)",
    )
    parser.add_argument(
        "--head", action="store_true", help="also compare with the LM head in the graph"
    )
    parser.add_argument(
        "--hlo",
        action="store_true",
        help="also print, per function, the kernels of XLA's compiled program and how many "
        "[rows, tokens] arrays each writes (the passes over memory)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also measure each function's time on the device from a profiler trace (the sum "
        "of its kernels' durations per call), free of the host's dispatch time",
    )
    parser.add_argument("--head_rows", type=int, default=32)
    parser.add_argument("--head_tokens", type=int, default=256)
    parser.add_argument("--head_hidden", type=int, default=256)
    parser.add_argument("--head_vocab", type=int, default=8192)
    parser.add_argument(
        "--step",
        action="store_true",
        help="also time TrainStep.update (model forward + backward + AdamW) with modulation on "
        "and off on a random Qwen2-style model",
    )
    parser.add_argument("--step_layers", type=int, default=4)
    parser.add_argument("--step_hidden", type=int, default=256)
    parser.add_argument("--step_vocab", type=int, default=32768)
    parser.add_argument("--step_rows", type=int, default=32)
    parser.add_argument("--step_prompt", type=int, default=64)
    parser.add_argument("--step_response", type=int, default=256)
    args = parser.parse_args()
    rows, length = args.rows, args.tokens

    keys = jax.random.split(jax.random.key(0), 5)
    logp = -jax.random.uniform(keys[0], (rows, length), minval=0.01, maxval=5.0)
    old_logp = logp + 0.1 * jax.random.normal(keys[1], (rows, length))
    entropy = jax.random.uniform(keys[2], (rows, length), maxval=3.0)
    adv = jax.random.normal(keys[3], (rows,))
    lengths = jax.random.randint(keys[4], (rows,), length // 4, length + 1)
    mask = (jnp.arange(length)[None] < lengths[:, None]).astype(jnp.float32)

    # Every array is an argument: closed-over arrays would become compile-time constants that
    # XLA may fold, which is not what a train step sees.
    def loss_only(lp, ent, old, a, m, e_vocab):
        s, n, _ = losses.policy_loss(lp, old, a, m)
        return losses.loss_value(s, n)

    def modulated(lp, ent, old, a, m, e_vocab, expectation="sequence"):
        final, _ = modulation.modulate_advantages(
            a,
            ent,
            lp,
            old,
            m,
            expectation=expectation,
            expected_pi_lambda=e_vocab if expectation == "vocab" else None,
        )
        s, n, _ = losses.policy_loss(lp, old, final, m)
        return losses.loss_value(s, n)

    def statistics(lp, ent, old, a, m, e_vocab):
        """The scope statistics alone (forward: H max/min, the row means, max Xi): what the
        modulated gradient must wait for, and so the floor of the bare overhead."""
        return modulation.scope_statistics(a, lp, old, ent, m)

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))  # noqa: E731
    e_vocab = 0.1 * entropy
    fns = {
        "loss": grad(loss_only),
        "sequence": grad(modulated),
        "vocab": grad(lambda *x: modulated(*x, expectation="vocab")),
        "statistics": jax.jit(statistics),
    }
    t = timeit_interleaved(
        fns, logp, entropy, old_logp, adv, mask, e_vocab, repeats=args.repeats, chain=args.chain
    )
    if args.hlo:
        args_ = (logp, entropy, old_logp, adv, mask, e_vocab)
        for name, fn in fns.items():
            print_kernels(name, fn, args_, (rows, length))
    if args.profile:
        args_ = (logp, entropy, old_logp, adv, mask, e_vocab)
        # A function that does almost nothing with the same arguments: the floor that the
        # host's dispatch sets under the wall-clock timings above.
        fns_p = dict(fns, dispatch_floor=jax.jit(lambda lp, *_: lp[0, 0] + 1.0))
        busy = profile_device_time(fns_p, args_, calls=max(args.chain, 10))
        if busy["loss"] > 0:
            print(
                f"modulation overhead in device time: "
                f"{100 * (busy['sequence'] / busy['loss'] - 1):.1f}% (sequence), "
                f"{100 * (busy['vocab'] / busy['loss'] - 1):.1f}% (vocab); the wall-clock "
                f"timings below are bound by the host's dispatch where dispatch_floor's wall "
                f"time is close to the loss's\n"
            )
    t_loss, t_mod, t_voc = t["loss"], t["sequence"], t["vocab"]
    print(
        f"device: {jax.devices()[0].device_kind}, rows={rows}, tokens={length}, "
        f"{args.chain} call(s) per sample"
    )
    print(f"{'computation (fwd+bwd)':44s} {'ms':>9s} {'vs loss':>8s}")
    print(f"{'policy_loss alone':44s} {t_loss * 1e3:9.3f} {1.0:8.2f}")
    print(
        f"{'modulate_advantages + policy_loss (sequence)':44s} {t_mod * 1e3:9.3f} "
        f"{t_mod / t_loss:8.2f}"
    )
    print(
        f"{'modulate_advantages + policy_loss (vocab)':44s} {t_voc * 1e3:9.3f} "
        f"{t_voc / t_loss:8.2f}"
    )
    print(
        f"modulation overhead: {100 * (t_mod / t_loss - 1):.1f}% (sequence), "
        f"{100 * (t_voc / t_loss - 1):.1f}% (vocab)"
    )
    t_stats = t["statistics"]
    print(
        f"{'scope statistics alone (forward, sequence)':44s} {t_stats * 1e3:9.3f} "
        f"{t_stats / t_loss:8.2f}"
    )
    print(
        f"the modulated gradient cannot start before these statistics exist: they alone are "
        f"{100 * t_stats / t_loss:.1f}% of the loss, and the measured overhead (sequence) is "
        f"{(t_mod - t_loss) / t_stats:.2f}x their time"
    )
    if args.head:
        head_comparison(
            args.head_rows,
            args.head_tokens,
            args.head_hidden,
            args.head_vocab,
            args.repeats,
            args.chain,
        )
    if args.step:
        step_comparison(args)


def profile_device_time(fns: dict, args: tuple, calls: int) -> dict[str, float]:
    """Per function: wall time per call of `calls` chained calls; the device's busy time per
    call (the summed durations of the kernels in a profiler trace); and the span per call
    (first kernel's start to last kernel's end: busy time plus the gaps between the call's
    kernels). Where the trace has no device timeline (a CPU backend), only the wall time."""
    out = {}
    print(
        f"\n{'profiled (per call)':28s} {'wall ms':>9s} {'device ms':>10s} {'span ms':>9s} "
        f"{'kernels':>8s}"
    )
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args))
        with tempfile.TemporaryDirectory() as log_dir:
            with jax.profiler.trace(log_dir, create_perfetto_trace=True):
                t0 = time.perf_counter()
                jax.block_until_ready([fn(*args) for _ in range(calls)])
                wall = (time.perf_counter() - t0) / calls
            (path,) = glob.glob(f"{log_dir}/**/perfetto_trace.json.gz", recursive=True)
            with gzip.open(path) as f:
                trace = json.load(f)
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        processes, threads = {}, {}
        for e in events:
            if e.get("ph") == "M" and e.get("name") == "process_name":
                processes[e["pid"]] = e["args"]["name"]
            if e.get("ph") == "M" and e.get("name") == "thread_name":
                threads[(e["pid"], e["tid"])] = e["args"]["name"]
        device_pids = {pid for pid, n in processes.items() if "/device:" in n}
        busy, kernels, lines, by_kernel, spans = 0.0, 0, {}, {}, []
        for e in events:
            if e.get("ph") != "X" or e.get("pid") not in device_pids:
                continue
            line = threads.get((e["pid"], e["tid"]), "?")
            count, total = lines.get(line, (0, 0.0))
            lines[line] = (count + 1, total + float(e.get("dur", 0.0)))
            if line.startswith("Stream"):
                busy += float(e.get("dur", 0.0)) * 1e-6  # trace times are in microseconds
                kernels += 1
                by_kernel[e["name"]] = by_kernel.get(e["name"], 0.0) + float(e.get("dur", 0.0))
                spans.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))))
        # Each call runs the same kernels in the same order on one stream: group them per call
        # and take first start -> last end, which adds the gaps between a call's kernels.
        per_call = kernels // calls if kernels % calls == 0 else 0
        spans.sort()
        span = (
            sum(spans[i + per_call - 1][1] - spans[i][0] for i in range(0, len(spans), per_call))
            * 1e-6
            / calls
            if per_call
            else float("nan")
        )
        device = (
            f"{busy / calls * 1e3:10.4f} {span * 1e3:9.4f}" if kernels else f"{'n/a':>10s} {'':9s}"
        )
        print(f"{name:28s} {wall * 1e3:9.4f} {device} {kernels / calls:8.1f}")
        if name == "loss":
            for line, (count, total) in sorted(lines.items()):
                print(f"   device timeline {line!r}: {count} events, {total / calls:.1f} us/call")
        if by_kernel and name in ("loss", "sequence"):
            top = sorted(by_kernel.items(), key=lambda kv: -kv[1])
            print("   " + ", ".join(f"{k} {v / calls:.1f} us" for k, v in top))
        out[name] = busy / calls
    return out


def print_kernels(name: str, fn, args: tuple, full_shape: tuple[int, int]) -> None:
    """The top-level instructions of XLA's optimised program (one kernel each, bar tuples,
    parameters, constants and bitcasts) and the full [rows, tokens] arrays they write (a
    multi-output fusion may write several)."""
    text = fn.lower(*args).compile().as_text()
    entry = text[text.index("ENTRY") :]
    entry = entry[: entry.index("\n}")]
    full = f"[{full_shape[0]},{full_shape[1]}]"
    kernels, writes = [], []
    for line in entry.splitlines()[1:]:
        line = line.strip()
        found = re.match(r"(?:ROOT )?%?(\S+) = (.*?)\s([a-z][\w.-]*)\(", line)
        if not found:
            continue
        lhs, out_type, op = found.groups()
        if op in ("parameter", "constant", "tuple", "bitcast", "get-tuple-element"):
            continue
        kernels.append(f"{lhs}:{op}")
        for dtype in re.findall(r"(\w+)" + re.escape(full), out_type):
            writes.append(f"{lhs}:{dtype}")
    print(f"[hlo] {name}: {len(kernels)} kernels, {len(writes)} {full} arrays written")
    print("   kernels: " + ", ".join(kernels))
    print("   full-size writes: " + ", ".join(writes))


def head_comparison(
    rows: int, length: int, hidden: int, vocab: int, repeats: int, chain: int = 1
) -> None:
    """The same comparison with the LM-head log-probs/entropy in the graph, as in a train step
    (the transformer body excluded): what modulation costs relative to the loss computation a
    user actually runs."""
    keys = jax.random.split(jax.random.key(1), 5)
    h = jax.random.normal(keys[0], (rows, length, hidden)) / hidden**0.5
    w = jax.random.normal(keys[1], (hidden, vocab))
    targets = jax.random.randint(keys[2], (rows, length), 0, vocab)
    adv = jax.random.normal(keys[3], (rows,))
    mask = jnp.ones((rows, length))
    old_logp = losses.token_logprobs_and_entropy(h, w, targets, 1.0, 64).logp - 0.01

    def head_loss(hh, ww, tt, a, old, m, modulate):
        stats = losses.token_logprobs_and_entropy(hh, ww, tt, 1.0, 64)
        if modulate:
            a, _ = modulation.modulate_advantages(a, stats.entropy, stats.logp, old, m)
        s, n, _ = losses.policy_loss(stats.logp, old, a, m)
        return losses.loss_value(s, n)

    fns = {
        "plain": jax.jit(jax.grad(lambda *x: head_loss(*x, False))),
        "modulated": jax.jit(jax.grad(lambda *x: head_loss(*x, True))),
    }
    t = timeit_interleaved(fns, h, w, targets, adv, old_logp, mask, repeats=repeats, chain=chain)
    print(
        f"\nwith the LM head in the graph: rows={rows}, tokens={length}, hidden={hidden}, "
        f"vocab={vocab}"
    )
    print(f"{'head log-probs + policy_loss':44s} {t['plain'] * 1e3:9.3f} {1.0:8.2f}")
    print(
        f"{'head log-probs + modulation + policy_loss':44s} {t['modulated'] * 1e3:9.3f} "
        f"{t['modulated'] / t['plain']:8.2f}"
    )
    print(f"modulation overhead with the head: {100 * (t['modulated'] / t['plain'] - 1):.1f}%")


def step_comparison(args: argparse.Namespace) -> None:
    """TrainStep.update (one minibatch, one micro-batch, on-policy) with modulation on and off:
    what modulation adds to the update a trainer runs."""
    from dynamo_jax import train_step as ts
    from dynamo_jax.config import get_default_config
    from dynamo_jax.models import ModelConfig, init_model

    d, rows, p, m = args.step_hidden, args.step_rows, args.step_prompt, args.step_response
    cfg = ModelConfig(
        model_type="qwen2",
        vocab_size=args.step_vocab,
        hidden_size=d,
        intermediate_size=4 * d,
        num_layers=args.step_layers,
        num_heads=d // 64,
        num_kv_heads=max(1, d // 256),
        head_dim=64,
        max_position_embeddings=p + m,
        tie_word_embeddings=True,
    )
    rng = np.random.default_rng(0)
    lens = rng.integers(m // 4, m + 1, rows)
    batch = ts.batch_from_rollouts(
        rng.integers(1, cfg.vocab_size, (rows, p)),
        np.full(rows, p),
        rng.integers(1, cfg.vocab_size, (rows, m)),
        (np.arange(m)[None] < lens[:, None]).astype(np.float32),
        pad_id=0,
    )
    groups = max(1, rows // 8)
    batch.update(
        rewards=rng.choice([-1.0, 1.0], rows).astype(np.float32),
        group_ids=np.repeat(np.arange(groups), rows // groups).astype(np.int32),
        valid=np.ones(rows, bool),
    )
    model = init_model(cfg, 0)
    steps, states = {}, {}
    for name, on in (("modulation off", False), ("modulation on", True)):
        c = get_default_config()
        c.train.num_minibatches, c.train.micro_batch_rows = 1, rows
        c.sampling.max_new_tokens = m
        c.loss.logits_chunk_size = min(m, 128)
        c.modulation.comp = c.modulation.stab = on
        tx = ts.make_optimizer(c)
        graphdef, rest, state = ts.init_train_state(model, tx)
        steps[name] = ts.TrainStep(graphdef, rest, tx, ts.StepSettings.from_config(c, groups))
        # own parameter buffers per variant: the update donates its state
        states[name] = state.replace(params=jax.tree.map(jnp.copy, state.params))

    def run(name):
        def f():
            states[name], metrics = steps[name].update(states[name], batch, jax.random.key(1))
            return metrics

        return f

    t = timeit_interleaved({n: run(n) for n in steps}, repeats=args.repeats)
    n_params = sum(x.size for x in jax.tree.leaves(states["modulation on"].params))
    print(
        f"\ntrain-step update (forward + backward + AdamW, on-policy): {args.step_layers} layers, "
        f"d={d}, vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M params; {rows} rows x "
        f"({p} prompt + {m} response) tokens"
    )
    off, on = t["modulation off"], t["modulation on"]
    print(f"{'update, modulation off':44s} {off * 1e3:9.1f} {1.0:8.2f}")
    print(f"{'update, modulation on':44s} {on * 1e3:9.1f} {on / off:8.2f}")
    print(f"modulation overhead in the update: {100 * (on / off - 1):.1f}%")


if __name__ == "__main__":
    main()
