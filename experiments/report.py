"""Plots and tables for docs/RESULTS.md from an ablation sweep, plus experiments (i)-(iv).

    python -m experiments.report --out runs/ablations --dest docs/results

Reads OUT/<variant>/seed<k>/ (written by `python -m experiments.ablations`) and writes into
DEST: accuracy_vs_rollouts.png (iii), zero_variance.png (ii), training_curves.png,
allocation_<variant>.png, pg_covariance.png (i), entropy_change.png (iv),
controlled_allocation.png, report_<part>.md (the tables) and results.json (every number).
Experiments (i) and (iv) use the sweep's warm start OUT/_sft (run the sweep, or just its warm
start, first), or with `--policy_run OUT/<variant>/seed<k>` the parameters of that run's
checkpoint (`--policy_step`, default its latest): the same measurements later in training.
`--only` picks a comma-separated subset of: sweep, i, iv, controlled.

    python -m experiments.report --out runs/ablations --only i --dest docs/results/grpo_step300 \
        --policy_run runs/ablations/grpo/seed0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from dynamo_jax import analysis

PARTS = ("sweep", "i", "iv", "controlled")


def last_common_evals(runs, count: int = 3) -> tuple[float, list[float]]:
    """Mean held-out accuracy over the last `count` evaluation steps that every run has, and
    those steps. Seeds evaluated at different intervals (every 25 or 50 steps) would otherwise
    average different windows: the last three of one are 250-300, of the other 200-300."""
    curves = [dict(zip(*analysis.series(r["metrics"], "eval_accuracy"), strict=True)) for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        return float("nan"), []
    window = sorted(set.intersection(*(set(c) for c in curves)))[-count:]
    return float(np.mean([[c[x] for x in window] for c in curves])), window


def policy_at_checkpoint(
    policy: analysis.Policy, run_dir: str, step: int, config
) -> tuple[analysis.Policy, int]:
    """`policy` with the parameters a run saved at `step` (-1: its latest checkpoint)."""
    import dataclasses

    from experiments import eval as eval_script

    directory = os.path.join(run_dir, "checkpoints")
    steps = eval_script.checkpoint_steps(run_dir)
    step = steps[-1] if step == -1 and steps else step
    if step not in steps:
        raise SystemExit(
            f"--policy_run {run_dir} --policy_step {step}: no such checkpoint under "
            f"{directory} (saved steps: {steps or 'none'})"
        )
    params = eval_script.restore_params(directory, step, policy.params, policy.mesh, config)
    return dataclasses.replace(policy, params=params), step


def sweep_tables(sweep, rollouts_per_step: int, first_epoch_steps: int | None) -> str:
    lines = [
        "| variant | seeds | steps | held-out before | held-out after (mean +- std) "
        "| per seed | mean of the last 3 evals every seed has | zero-var share, all steps "
        + ("| zero-var share after epoch 1 " if first_epoch_steps else "")
        + "|",
        "|---|---|---|---|---|---|---|---|" + ("---|" if first_epoch_steps else ""),
    ]
    for v in analysis.DEFAULT_VARIANTS + tuple(k for k in sweep if k not in analysis.VARIANTS):
        if v not in sweep:
            continue
        runs = sweep[v]
        after = [r["summary"].get("heldout_accuracy_after") for r in runs.values()]
        after = [a for a in after if a is not None]
        before = [r["summary"].get("heldout_accuracy_before") for r in runs.values()]
        before = [b for b in before if b is not None]
        steps = [len(r["metrics"]) for r in runs.values()]
        last3, window = last_common_evals(runs.values())
        zv_all, zv_late = [], []
        for r in runs.values():
            x, zv = analysis.series(r["metrics"], "zero_variance_frac")
            zv_all.append(float(np.mean(zv)))
            if first_epoch_steps and (x > first_epoch_steps).any():
                zv_late.append(float(np.mean(zv[x > first_epoch_steps])))
        std = f" +- {np.std(after, ddof=1):.3f}" if len(after) > 1 else ""
        row = (
            (
                f"| {analysis.VARIANT_LABELS.get(v, v)} | {len(runs)} | {min(steps)} "
                f"| {np.mean(before):.3f} "
                f"| {np.mean(after):.3f}{std} | {', '.join(f'{a:.3f}' for a in after)} "
                f"| {last3:.3f} (steps {', '.join(str(int(x)) for x in window)}) "
                f"| {np.mean(zv_all):.3f} |"
            )
            if after
            else f"| {v} | {len(runs)} | {min(steps)} | (unfinished) | | | | |"
        )
        if first_epoch_steps and after:
            row += f" {np.mean(zv_late):.3f} |" if zv_late else " |"
        lines.append(row)
    return "\n".join(lines)


def _window_means(runs, window) -> dict[int, float]:
    """Per seed: the mean held-out accuracy over the evaluation steps in `window`."""
    out = {}
    for seed, r in runs.items():
        curve = dict(zip(*analysis.series(r["metrics"], "eval_accuracy"), strict=True))
        if all(x in curve for x in window):
            out[int(seed)] = float(np.mean([curve[x] for x in window]))
    return out


def _after_training(runs) -> dict[int, float]:
    """Per seed: the held-out accuracy after training (finished runs only)."""
    return {
        int(seed): r["summary"]["heldout_accuracy_after"]
        for seed, r in runs.items()
        if r["summary"].get("heldout_accuracy_after") is not None
    }


# Each variant against GRPO, and the variants that share DynaMO's eps_high 0.28 also against the
# clip-higher control (GRPO with that clip), which separates the mechanisms from the wider clip.
PAIRED_REFERENCES = {
    "grpo": ("dynamo", "alloc_only", "modulation_only", "comp_only", "stab_only", "clip_higher"),
    "clip_higher": ("dynamo", "alloc_only", "modulation_only", "comp_only", "stab_only"),
}


def paired_table(sweep) -> str:
    """Differences of held-out accuracy to a reference variant, paired by seed: at the end of
    training and over the last 3 evaluation steps every run of both has. Mean +- standard error
    of the paired difference, the two-sided paired-t p-value (no correction for the number of
    comparisons) and how many seeds are below the reference."""
    lines = [
        "| variant | against | seeds | after training: difference +- s.e. (p) | below "
        "| last 3 evals: difference +- s.e. (p), steps | below |",
        "|---|---|---|---|---|---|---|",
    ]
    for ref, variants in PAIRED_REFERENCES.items():
        if ref not in sweep:
            continue
        ref_after = _after_training(sweep[ref])
        for v in variants:
            if v not in sweep:
                continue
            after = _after_training(sweep[v])
            _, window = last_common_evals([*sweep[v].values(), *sweep[ref].values()])
            end = analysis.paired_difference(after, ref_after)
            late = analysis.paired_difference(
                _window_means(sweep[v], window), _window_means(sweep[ref], window)
            )

            def cell(d):
                return f"{d['mean']:+.4f} +- {d['se']:.4f} (p {d['p']:.3f})"

            lines.append(
                f"| {analysis.VARIANT_LABELS.get(v, v)} | {analysis.VARIANT_LABELS.get(ref, ref)} "
                f"| {int(end['n'])} | {cell(end)} | {int(end['below'])} of {int(end['n'])} "
                f"| {cell(late)}, {', '.join(str(int(x)) for x in window)} "
                f"| {int(late['below'])} of {int(late['n'])} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="sweep directory (from experiments.ablations)")
    p.add_argument("--dest", default="docs/results", help="where PNGs, report.md, json go")
    p.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, from {', '.join(PARTS)} (default: all)",
    )
    p.add_argument(
        "--config",
        default=analysis.DEFAULT_CONFIG,
        help="base config of the sweep (batch size, allocation range, the warm start's model)",
    )
    p.add_argument("--draws", type=int, default=50, help="(i): independent batches per mode")
    p.add_argument("--history", type=int, default=16, help="(i): rollouts per prompt of history")
    p.add_argument("--entropy_batches", type=int, default=8, help="(iv): batches")
    p.add_argument(
        "--entropy_lrs", default="1e-3,1e-2", help="(iv): comma-separated SGD learning rates"
    )
    p.add_argument("--entropy_adam_lr", type=float, default=1e-4, help="(iv): AdamW lr (0: skip)")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed of experiments i, iv and controlled"
    )
    p.add_argument(
        "--policy_run",
        default="",
        help="(i), (iv): measure at a checkpoint of this run's work dir (e.g. "
        "OUT/grpo/seed0) instead of at the warm start",
    )
    p.add_argument(
        "--policy_step", type=int, default=-1, help="(i), (iv): the --policy_run step (-1: latest)"
    )
    args = p.parse_args(argv)
    parts = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = sorted(parts - set(PARTS))
    if unknown or not parts:
        what = f"unknown parts {unknown}" if unknown else "no parts"
        p.error(f"--only {args.only}: {what}; give comma-separated parts from {', '.join(PARTS)}")
    try:
        lrs = [float(x) for x in args.entropy_lrs.split(",") if x.strip()]
    except ValueError:
        p.error(
            f"--entropy_lrs {args.entropy_lrs}: expected comma-separated numbers, e.g. 1e-3,1e-2"
        )
    sweep = analysis.load_sweep(args.out) if "sweep" in parts else {}
    if "sweep" in parts and not sweep:
        print(
            f"{p.prog}: error: no runs under {args.out}: expected run directories "
            f"{os.path.join(args.out, '<variant>', 'seed<k>')}/metrics.jsonl, as written by "
            f"`python -m experiments.ablations --out {args.out}` (or leave out the sweep part, "
            f"e.g. --only controlled)",
            file=sys.stderr,
        )
        return 1
    sft = os.path.join(args.out, analysis.SFT_DIRNAME)
    if parts & {"i", "iv"} and not os.path.exists(os.path.join(sft, "sft_model", "config.json")):
        print(
            f"{p.prog}: error: parts i and iv need the sweep's warm start {sft}/sft_model/: create "
            f"it with `python -m experiments.ablations --out {args.out} --warm_start_only` "
            f"(or leave those parts out with --only)",
            file=sys.stderr,
        )
        return 1
    os.makedirs(args.dest, exist_ok=True)
    config = analysis.load_base_config(args.config)
    B = config.prompts_per_step * config.rollouts_per_prompt
    results: dict = {}
    md: dict[str, str] = {}
    json_path = os.path.join(args.dest, "results.json")
    if os.path.exists(json_path):
        results = json.load(open(json_path))

    def dest(name):
        return os.path.join(args.dest, name)

    if sweep:
        epoch = -(-config.data.num_train // config.prompts_per_step)
        analysis.plot_accuracy_vs_rollouts(sweep, B, dest("accuracy_vs_rollouts.png"))
        analysis.plot_zero_variance(sweep, dest("zero_variance.png"))
        analysis.plot_training_curves(sweep, dest("training_curves.png"))
        for v in ("dynamo", "alloc_only"):
            if v in sweep:
                seed = min(sweep[v])
                hists = analysis.read_allocation_histograms(sweep[v][seed]["workdir"])
                analysis.plot_allocation_histogram(
                    hists,
                    config.allocation.n_high,
                    dest(f"allocation_{v}.png"),
                    f"{analysis.VARIANT_LABELS[v]}, seed {seed}: prompts per group size",
                )
        table = sweep_tables(sweep, B, epoch) + "\n\n" + paired_table(sweep)
        md["sweep"] = table
        results["sweep"] = {
            v: {
                str(s): {
                    "summary": r["summary"],
                    # the steps too: seeds were evaluated at different intervals
                    "eval_steps": analysis.series(r["metrics"], "eval_accuracy")[0].tolist(),
                    "eval": analysis.series(r["metrics"], "eval_accuracy")[1].tolist(),
                }
                for s, r in runs.items()
            }
            for v, runs in sweep.items()
        }
        print(table)

    if "controlled" in parts:
        r = analysis.controlled_allocation_experiment(seed=args.seed)
        analysis.plot_controlled(r, dest("controlled_allocation.png"))
        curves = analysis.controlled_vs_history(seed=args.seed)
        analysis.plot_controlled_vs_history(curves, dest("controlled_vs_history.png"))
        results["controlled_vs_history"] = analysis.to_jsonable(curves)
        table = analysis.controlled_table(r) + "\n\n" + analysis.controlled_vs_history_table(curves)
        md["controlled"] = table
        results["controlled"] = analysis.to_jsonable(r)
        print(table)

    policy = None
    if parts & {"i", "iv"}:
        policy = analysis.load_policy(sft, config)
        if args.policy_run:
            policy, step = policy_at_checkpoint(policy, args.policy_run, args.policy_step, config)
            print(f"(i), (iv) at step {step} of {args.policy_run}")
            results["policy"] = {"run": args.policy_run, "step": step}

    if "i" in parts:
        t0 = time.time()
        r = analysis.pg_covariance_experiment(
            policy, draws=args.draws, history=args.history, seed=args.seed, log=print
        )
        analysis.plot_pg_covariance(r, dest("pg_covariance.png"))
        table = analysis.pg_covariance_table(r)
        md["i"] = f"{args.draws} draws per mode, {time.time() - t0:.0f} s\n\n{table}"
        results["pg_covariance"] = analysis.to_jsonable(r)
        print(table)

    if "iv" in parts:
        t0 = time.time()
        r = analysis.entropy_change_experiment(
            policy, batches=args.entropy_batches, learning_rates=lrs, seed=args.seed, log=print
        )
        analysis.plot_entropy_change(r, dest("entropy_change.png"))
        tables = [analysis.entropy_change_table(r)]
        results["entropy_change"] = analysis.to_jsonable(
            {
                **r,
                "by_lr": {
                    str(k): {kk: vv for kk, vv in v.items() if kk != "samples"}
                    for k, v in r["by_lr"].items()
                },
            }
        )
        if args.entropy_adam_lr > 0:
            ra = analysis.entropy_change_experiment(
                policy,
                batches=args.entropy_batches,
                learning_rates=[args.entropy_adam_lr],
                optimizer="adam",
                seed=args.seed,
            )
            tables.append("\n".join(analysis.entropy_change_table(ra).splitlines()[2:]))
            results["entropy_change_adam"] = analysis.to_jsonable(
                {
                    **ra,
                    "by_lr": {
                        str(k): {kk: vv for kk, vv in v.items() if kk != "samples"}
                        for k, v in ra["by_lr"].items()
                    },
                }
            )
        table = "\n".join(tables)
        md["iv"] = f"{args.entropy_batches} batches, {time.time() - t0:.0f} s\n\n{table}"
        print(table)

    with open(json_path, "w") as f:
        json.dump(analysis.to_jsonable(results), f, indent=1)
    for part, text in md.items():
        with open(dest(f"report_{part}.md"), "w") as f:
            f.write(text + "\n")
    print(f"wrote {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
