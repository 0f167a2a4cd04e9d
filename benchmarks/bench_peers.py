"""GRPO step time side by side: dynamo_jax vs TRL's GRPOTrainer vs tunix's GRPOLearner.

The same work for all three: one tiny random Qwen2 (2 layers, hidden 64, intermediate 128, 4/2
heads of 16, vocabulary 512, tied embeddings, float32; the SAME weights: ours is saved with
`save_pretrained` and the peers load that folder), 8 prompts of 16 tokens x 8 rollouts x exactly
32 new tokens (EOS never stops a row: ours has no EOS ids, TRL gets min_new_tokens = 32, tunix an
EOS id outside the vocabulary), temperature 1, random +-1 rewards, GRPO advantages, no KL term,
one optimiser step (AdamW) per RL step on all 64 rows (one minibatch, no gradient accumulation).

Ours runs in this process (dynamo_jax Sampler + TrainStep, as the trainer drives them, on a
one-device mesh), in three variants: modulation on (the default DynaMO loss), modulation off (plain
clipped token-mean GRPO), and modulation on with a separate forward pass for the behaviour
log-probs (what a config with several minibatches per step needs; with one minibatch, as here and
as in the peers, the update takes them from its own forward pass, exactly). The peers run in
their own virtual environments (benchmarks/peers/*.py, started with that environment's python);
each reports the time at which its reward function was called, once per RL step: the spacing of
those calls is its step time.

Reported: steady-state seconds per RL step = the median step after --warmup steps, and the ratio
of the faster peer's step to ours (the issue's target: >= 2).

Setup of the peer environments (once; see docs/BENCHMARKS_TRAINER.md):
  python3 -m venv /tmp/venv_trl && /tmp/venv_trl/bin/pip install torch==2.13.0 && \\
    echo torch==2.13.0 > /tmp/c.txt && /tmp/venv_trl/bin/pip install -c /tmp/c.txt trl==1.16.0
  python3 -m venv /tmp/venv_tunix && /tmp/venv_tunix/bin/pip install google-tunix==0.1.7

  python benchmarks/bench_peers.py                   # ours + both peers (~4 min on 2 cores)
  python benchmarks/bench_peers.py --peers trl       # or --peers none
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_PYTHON = {"trl": "/tmp/venv_trl/bin/python", "tunix": "/tmp/venv_tunix/bin/python"}
PEER_SCRIPT = {
    "trl": os.path.join(HERE, "peers", "trl_grpo.py"),
    "tunix": os.path.join(HERE, "peers", "tunix_grpo.py"),
}
MODEL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    qkv_bias=True,
)
PAD, EOS = 0, 1  # token ids; words "w0".."w509" are ids 2..511


def build_assets(workdir: str, args: argparse.Namespace) -> dict:
    """Model folder (HF layout), tokenizer folder and prompts shared by the three runs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dynamo_jax.models import ModelConfig, init_model, save_pretrained

    cfg = ModelConfig(model_type="qwen2", max_position_embeddings=256, **MODEL)
    model = init_model(cfg, 0)
    model_dir = os.path.join(workdir, "model")
    save_pretrained(model, model_dir)
    vocab = {"<pad>": PAD, "<eos>": EOS}
    vocab.update({f"w{i}": i + 2 for i in range(cfg.vocab_size - 2)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    tok_dir = os.path.join(workdir, "tokenizer")
    hf_tok.save_pretrained(tok_dir)
    rng = np.random.default_rng(0)
    n_steps = args.warmup + args.steps
    ids = rng.integers(2, cfg.vocab_size, (n_steps * args.prompts, args.prompt_len))
    prompts = [" ".join(f"w{i - 2}" for i in row) for row in ids]
    assert hf_tok(prompts[0])["input_ids"] == ids[0].tolist(), "tokenizer round trip"
    spec = dict(
        model_dir=model_dir,
        tokenizer_dir=tok_dir,
        prompts=prompts,
        prompt_ids=ids.tolist(),
        num_prompts=args.prompts,
        num_generations=args.group,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        steps=n_steps,
        learning_rate=1e-4,
        model=MODEL,
        seed=0,
    )
    with open(os.path.join(workdir, "spec.json"), "w") as f:
        json.dump(spec, f)
    return spec


def run_ours(spec: dict, variant: str) -> list[float]:
    """Seconds per RL step for `variant` in {"mod_on", "mod_off", "mod_on_old_logp_pass"}."""
    from dynamo_jax import compilation
    from dynamo_jax import sharding as shd
    from dynamo_jax import train_step as ts
    from dynamo_jax.buckets import BucketSpec
    from dynamo_jax.config import get_default_config
    from dynamo_jax.models import load_pretrained
    from dynamo_jax.sampling import Sampler

    n, g, m = spec["num_prompts"], spec["num_generations"], spec["new_tokens"]
    rows = n * g
    c = get_default_config()
    c.prompts_per_step, c.rollouts_per_prompt = n, g
    c.allocation.mode = "uniform"
    c.sampling.max_new_tokens = m
    c.train.num_minibatches = 1
    c.train.micro_batch_rows = rows
    c.loss.logits_chunk_size = m
    c.optim.learning_rate = spec["learning_rate"]
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.modulation.comp = c.modulation.stab = variant != "mod_off"
    mesh = shd.make_mesh(data=-1, fsdp=1, tensor=1)
    model = load_pretrained(spec["model_dir"], mesh=mesh)
    tx = ts.make_optimizer(c)
    graphdef, rest, state = ts.init_train_state(model, tx)
    step_fn = ts.TrainStep(
        graphdef,
        rest,
        tx,
        ts.StepSettings.from_config(c, num_groups=n),
        ts.state_shardings(state),
        shd.batch_sharding(mesh),
    )
    bucket = BucketSpec((spec["prompt_len"],), (rows,), (n,), m)
    sampler = Sampler(model, eos_ids=(), pad_id=PAD, spec=bucket)
    del model
    prompts = spec["prompt_ids"]
    rng = np.random.default_rng(spec["seed"])
    key = jax.random.key(spec["seed"])
    group_sizes = np.full(n, g, np.int64)  # allocation: uniform, 8 rollouts each
    compilation.install()
    marks = [time.perf_counter()]
    compiles, phases = [], []
    for step in range(spec["steps"]):
        with compilation.CompileCounter() as cc:
            t0 = time.perf_counter()
            batch_prompts = prompts[step * n : (step + 1) * n]
            out = sampler.generate(
                state.params,
                batch_prompts,
                np.arange(step * n, (step + 1) * n),
                group_sizes,
                jax.random.fold_in(key, step),
            )
            t1 = time.perf_counter()
            rewards = rng.choice([-1.0, 1.0], rows).astype(np.float32) * out.valid
            batch = ts.batch_from_rollouts(
                out.prompt_tokens, out.prompt_lengths, out.response_tokens, out.response_mask, PAD
            )
            batch.update(rewards=rewards, group_ids=out.group_id.astype(np.int32), valid=out.valid)
            if variant == "mod_on_old_logp_pass":
                # What a config with several minibatches per step needs: a separate no-grad
                # forward for the behaviour log-probs (the trainer skips it with one minibatch).
                batch["old_logp"] = step_fn.logprobs(state.params, batch).logp
                jax.block_until_ready(batch["old_logp"])
            t2 = time.perf_counter()
            state, metrics = step_fn.update(state, batch, jax.random.fold_in(key, 2**20 + step))
            jax.device_get(metrics)
        marks.append(time.perf_counter())
        compiles.append(cc.count)
        phases.append((t1 - t0, t2 - t1, marks[-1] - t2))
    return [float(x) for x in np.diff(marks)], compiles, phases


def run_peer(name: str, spec_path: str, timeout: float) -> dict:
    python = PEER_PYTHON[name]
    if not os.path.exists(python):
        return {"error": f"{python} not found (see the setup lines in this file's docstring)"}
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = ""  # the peer's own packages only (never /work/venv's)
    t = time.perf_counter()
    try:
        proc = subprocess.run(
            [python, PEER_SCRIPT[name], spec_path],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=tempfile.gettempdir(),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    wall = time.perf_counter() - t
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    if result is None:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"error": f"exit {proc.returncode}, no RESULT line; output tail:\n{tail}"}
    result["wall_s"] = wall
    return result


def steady(step_s: list[float], warmup: int) -> float:
    return float(np.median(step_s[warmup:]))


def _run_one(name: str, spec: dict, spec_path: str, args: argparse.Namespace) -> float | None:
    """Runs one system once; prints its line(s); returns its steady s/step (None: failed)."""
    if not name.startswith("ours"):
        r = run_peer(name, spec_path, args.peer_timeout)
        la = os.getloadavg()
        if "error" in r:
            print(f"  {name}: FAILED: {r['error']}")
            return None
        s = steady(r["step_s"], args.warmup)
        lens = r.get("completion_tokens_mean") or [float("nan")]
        print(
            f"  {name}: {s:.3f} s/step steady (median of {len(r['step_s']) - args.warmup}); "
            f"steps {[round(x, 3) for x in r['step_s']]}; process wall {r['wall_s']:.1f}s; "
            f"load average {la[0]:.2f}\n    {r.get('version', '')}; rows per reward call "
            f"{r.get('rows_per_reward_call')}, completion tokens per row {np.mean(lens):.2f} "
            f"(min {np.min(lens):.2f}); {r.get('notes', '')}"
        )
        return s
    variant = name[len("ours (") : -1]
    step_s, compiles, phases = run_ours(spec, variant)
    la = os.getloadavg()
    s = steady(step_s, args.warmup)
    sample_ms, logp_ms, update_ms = np.median(phases[args.warmup :], axis=0) * 1e3
    print(
        f"  {name}: {s:.3f} s/step steady (median of {len(step_s) - args.warmup}); "
        f"steps {[round(x, 3) for x in step_s]}; load average {la[0]:.2f}\n"
        f"    compilations per step {compiles}; median phases: sampling {sample_ms:.1f} ms, "
        f"rewards + batch + old log-probs {logp_ms:.1f} ms, update {update_ms:.1f} ms"
    )
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", default="trl,tunix", help="comma list of trl,tunix, or none")
    ap.add_argument("--variants", default="mod_on,mod_off,mod_on_old_logp_pass")
    ap.add_argument(
        "--warmup", type=int, default=3, help="steps not counted (>= 2: tunix compiles in 2)"
    )
    ap.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="runs of every system, order alternated")
    ap.add_argument("--peer-timeout", type=float, default=900)
    ap.add_argument("--keep", default="", help="write the shared assets here (kept)")
    args = ap.parse_args()

    workdir = args.keep or tempfile.mkdtemp(prefix="bench_peers_")
    os.makedirs(workdir, exist_ok=True)
    try:
        _main(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _main(args: argparse.Namespace, workdir: str) -> None:
    spec = build_assets(workdir, args)
    spec_path = os.path.join(workdir, "spec.json")
    la = os.getloadavg()
    print(
        f"{args.prompts} prompts x {args.group} rollouts x {args.new_tokens} new tokens "
        f"(prompt {args.prompt_len} tokens), model {MODEL}; warm-up {args.warmup}, timed "
        f"{args.steps}; {os.cpu_count()} cores, load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
    )
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    systems = peers + [f"ours ({v})" for v in args.variants.split(",") if v]
    medians: dict[str, list[float]] = {k: [] for k in systems}
    for rnd in range(args.rounds):
        # Alternate the order so that a change of machine load hits every system alike.
        order = systems if rnd % 2 == 0 else systems[::-1]
        print(f"\nround {rnd + 1}/{args.rounds}: {', '.join(order)}")
        for name in order:
            s = _run_one(name, spec, spec_path, args)
            if s is not None:
                medians[name].append(s)
    best = {k: min(v) for k, v in medians.items() if v}
    print("\nsteady s/step per round (best = lowest):")
    for k in systems:
        if medians[k]:
            rounds = ", ".join(f"{x:.3f}" for x in medians[k])
            print(f"  {k:28s} {rounds}  best {best[k]:.3f}")
        else:
            print(f"  {k:28s} FAILED")
    peer_best = {k: best[k] for k in peers if k in best}
    if peer_best:
        faster = min(peer_best, key=peer_best.get)
        print(f"faster peer: {faster} ({peer_best[faster]:.3f} s/step, best round)")
        for k in systems:
            if k.startswith("ours") and k in best:
                ratio = peer_best[faster] / best[k]
                per_round = [
                    min(medians[p][i] for p in peer_best) / medians[k][i]
                    for i in range(min(len(medians[k]), *(len(medians[p]) for p in peer_best)))
                ]
                verdict = "meets" if ratio >= 2 else "misses"
                print(
                    f"  {k}: {best[k]:.3f} s/step -> {faster} / ours = {ratio:.2f}x ({verdict} the "
                    f"2x target); per round {', '.join(f'{x:.2f}x' for x in per_round)}"
                )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
