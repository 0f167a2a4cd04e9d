"""Rollout sampling throughput: dynamo_jax Sampler vs transformers' PyTorch ``generate``.

Same random weights in both (our model saved with ``save_pretrained`` and loaded by
transformers), float32, every response exactly ``--new-tokens`` long (no EOS ids for us;
``min_new_tokens`` = ``max_new_tokens`` for PyTorch), sampling at temperature 1 with top-k/top-p
off. Prompts: ``batch / group`` distinct random prompts of ``--prompt-len`` tokens, each sampled
``group`` times (n_i = group).

Printed per (model, batch):
  ours      prefill seconds (shared: one prefill per unique prompt; unshared: one per row),
            decode tokens/s, end-to-end rollout tokens/s (prefill + decode + host copy);
  torch     prefill seconds (one forward over all rows), decode tokens/s, end-to-end tokens/s;
  bounds    decode step time if limited by memory bandwidth (weights + the KV cache our decode
            reads, over the copy bandwidth measured here) or by matmul throughput (measured
            here), and the fraction of each bound the measured decode reaches.

Examples:
  python benchmarks/bench_sampling.py                      # quick: small model, batch 64
  python benchmarks/bench_sampling.py --models small --batches 64,256
  python benchmarks/bench_sampling.py --models qwen0.5b --batches 64 --new-tokens 32
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynamo_jax.buckets import BucketSpec
from dynamo_jax.models import ModelConfig, init_model, save_pretrained
from dynamo_jax.sampling import Sampler

MODELS = {
    # 4 layers, d=512 (GQA 8/2 heads), 32k vocabulary.
    "small": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
    ),
    # Qwen2.5-0.5B shapes (tied embeddings).
    "qwen0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
    ),
}


def model_config(name: str, vocab: int | None) -> ModelConfig:
    kw = dict(MODELS[name])
    if vocab:
        kw["vocab_size"] = vocab
    return ModelConfig(model_type="qwen2", qkv_bias=True, rope_theta=1e6, **kw)


def copy_bandwidth(
    nbytes: int = 512 << 20, repeats: int = 5, on_device: bool | None = None
) -> float:
    """Bytes/s of a large copy, counting the read and the write (STREAM 'copy'): a numpy copy on
    a CPU backend, a jitted scale of a device array on an accelerator (whose memory the decode
    reads; a host copy there would measure the wrong memory)."""
    if on_device is None:
        on_device = jax.default_backend() != "cpu"
    if on_device:
        src = jnp.ones(nbytes // 4, jnp.float32)
        scale = jax.jit(lambda x: x * 2.0)
        scale(src).block_until_ready()
    else:
        src = np.ones(nbytes // 4, np.float32)
        dst = np.zeros_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        if on_device:
            scale(src).block_until_ready()
        else:
            np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a float32 [n, n] @ [n, n] through JAX (default precision)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def param_count(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters read per decode step, of which matmul weights)."""
    e, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = e * (q + 2 * kv) + q * e + 3 * e * f + (q + 2 * kv) + 2 * e
    head = e * cfg.vocab_size  # the LM head (= the embedding when tied) is read every step
    return n * layer + head + e, n * (e * (q + 2 * kv) + q * e + 3 * e * f) + head


def run_ours(model, cfg, prompts, group, new_tokens, repeats):
    batch = len(prompts) * group
    p = len(prompts[0])
    spec = BucketSpec(
        prompt_len_buckets=(p,),
        row_buckets=batch,
        prompt_count_buckets=(len(prompts), batch),
        max_new_tokens=new_tokens,
    )
    sampler = Sampler(model, eos_ids=(), pad_id=0, spec=spec)
    ids = np.arange(len(prompts))
    t = time.perf_counter()
    sampler.generate(model, prompts, ids, [group] * len(prompts), jax.random.key(0))
    compile_s = time.perf_counter() - t
    runs = []
    for i in range(repeats):
        r = sampler.generate(
            model, prompts, ids, [group] * len(prompts), jax.random.key(i + 1), timed=True
        )
        assert (r.response_lengths == new_tokens).all()
        runs.append(r.timings)
    best = min(runs, key=lambda x: x["prefill_s"] + x["decode_s"])
    # Prefill without prefix sharing: every row prefilled on its own (slots = rows).
    rows = [pr for pr in prompts for _ in range(group)]
    jax.block_until_ready(sampler.prefill(model, rows))  # compile
    unshared = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(sampler.prefill(model, rows))
        unshared.append(time.perf_counter() - t)
    total = best["prefill_s"] + best["decode_s"]
    return {
        "compile_s": compile_s,
        "prefill_shared_s": best["prefill_s"],
        "prefill_unshared_s": min(unshared),
        "decode_s": best["decode_s"],
        "decode_tok_s": batch * new_tokens / best["decode_s"],
        "e2e_s": total,
        "e2e_tok_s": batch * new_tokens / total,
        "e2e_unshared_tok_s": batch
        * new_tokens
        / (min(unshared) + best["decode_s"]),  # same decode, per-row prefill
    }


def run_torch(model_dir, prompts, group, new_tokens, repeats, threads):
    """PyTorch baseline; runs in a fresh (spawned) process, see ``torch_in_subprocess``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.eval()
    rows = torch.tensor([pr for pr in prompts for _ in range(group)], dtype=torch.long)
    batch = rows.shape[0]
    gen_kw = dict(
        do_sample=True,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=0,
        eos_token_id=None,
    )
    with torch.inference_mode():
        hf(rows[:, :8])  # warm-up
        prefill = []
        for _ in range(repeats):
            t = time.perf_counter()
            hf(rows, use_cache=True, logits_to_keep=1)  # as generate does
            prefill.append(time.perf_counter() - t)
        totals = []
        for i in range(repeats):
            torch.manual_seed(i)
            t = time.perf_counter()
            out = hf.generate(rows, attention_mask=torch.ones_like(rows), **gen_kw)
            totals.append(time.perf_counter() - t)
            assert out.shape[1] == rows.shape[1] + new_tokens
    total, pre = min(totals), min(prefill)
    return {
        "prefill_s": pre,
        "decode_s": total - pre,
        "decode_tok_s": batch * new_tokens / (total - pre),
        "e2e_s": total,
        "e2e_tok_s": batch * new_tokens / total,
    }


def torch_in_subprocess(model, *args):
    """Same weights through save_pretrained; torch runs in a spawned process before the JAX
    sampling work, so neither side shares a process (thread pools, allocator) with the other."""
    import multiprocessing

    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(run_torch, (d, *args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="small", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--batches", default="64", help="comma list of rollout rows")
    ap.add_argument("--group", type=int, default=16, help="rows per prompt (n_i)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per setting (best kept)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    args = ap.parse_args()

    bw = copy_bandwidth()
    flops = matmul_flops()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); "
        f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write); matmul {flops / 1e9:.0f} GFLOP/s; "
        f"load average {_load()}"
    )
    for name in args.models.split(","):
        cfg = model_config(name, args.vocab)
        model = init_model(cfg, 0)
        n_read, n_matmul = param_count(cfg)
        n_total = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
        print(
            f"\n== {name}: {cfg.num_layers} layers, d={cfg.hidden_size}, vocab {cfg.vocab_size}, "
            f"{n_total / 1e6:.1f}M params, float32"
        )
        rng = np.random.default_rng(0)
        for batch in [int(b) for b in args.batches.split(",")]:
            n_prompts = max(1, batch // args.group)
            prompts = [
                rng.integers(1, cfg.vocab_size, size=args.prompt_len).tolist()
                for _ in range(n_prompts)
            ]
            if not args.no_torch:
                th = torch_in_subprocess(
                    model, prompts, args.group, args.new_tokens, args.repeats, args.threads
                )
                th["load"] = _load()
            ours = run_ours(model, cfg, prompts, args.group, args.new_tokens, args.repeats)
            s = args.prompt_len + args.new_tokens
            kv_bytes = 2 * cfg.num_layers * batch * cfg.num_kv_heads * s * cfg.head_dim * 4
            step_bytes = 4 * n_read + kv_bytes
            mem_bound = step_bytes / bw
            flop_bound = 2 * n_matmul * batch / flops
            step = ours["decode_s"] / args.new_tokens
            print(
                f"batch {batch} ({n_prompts} prompts x {args.group}), prompt {args.prompt_len}, "
                f"{args.new_tokens} new tokens; load average after both runs {_load()}"
            )
            print(
                f"  ours : compile+first call {ours['compile_s']:.1f}s | prefill shared "
                f"{ours['prefill_shared_s']:.3f}s, unshared {ours['prefill_unshared_s']:.3f}s | "
                f"decode {ours['decode_tok_s']:.0f} tok/s ({step * 1e3:.1f} ms/step) | "
                f"end-to-end {ours['e2e_tok_s']:.0f} tok/s ({ours['e2e_s']:.1f}s); "
                f"unshared prefill {ours['e2e_unshared_tok_s']:.0f} tok/s"
            )
            print(
                f"  bound: memory {mem_bound * 1e3:.1f} ms/step ({step_bytes / 1e9:.2f} GB/step) "
                f"-> {mem_bound / step:.0%} of it; compute {flop_bound * 1e3:.1f} ms/step -> "
                f"{flop_bound / step:.0%} of it"
            )
            if not args.no_torch:
                print(
                    f"  torch: prefill {th['prefill_s']:.3f}s | decode {th['decode_tok_s']:.0f} "
                    f"tok/s ({th['decode_s'] / args.new_tokens * 1e3:.1f} ms/step) | end-to-end "
                    f"{th['e2e_tok_s']:.0f} tok/s ({th['e2e_s']:.1f}s); load average after it "
                    f"{th['load']}"
                )
                print(
                    f"  ratio ours/torch: end-to-end {ours['e2e_tok_s'] / th['e2e_tok_s']:.2f}x, "
                    f"decode {ours['decode_tok_s'] / th['decode_tok_s']:.2f}x, prefill "
                    f"{th['prefill_s'] / ours['prefill_shared_s']:.2f}x (shared) "
                    f"{th['prefill_s'] / ours['prefill_unshared_s']:.2f}x (unshared)"
                )


if __name__ == "__main__":
    main()
