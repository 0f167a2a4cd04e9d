"""DynaMO ablation sweep on the embedded task: every variant x seed, resumable.

    python -m experiments.ablations --out runs/ablations --seeds 0,1,2 --steps 300 --jobs 16
    python -m experiments.report --out runs/ablations   # plots + tables

Variants (`dynamo_jax.analysis.VARIANTS`, all overrides of configs/arith_tiny.py): dynamo,
grpo (uniform, no modulation, eps_high 0.2), alloc_only, modulation_only, comp_only, stab_only,
clip_higher (GRPO with DynaMO's eps_high 0.28; every ablation keeps 0.28).

The supervised warm start runs once into OUT/_sft and is copied into every run; each run is an
`experiments.train` subprocess writing OUT/<variant>/seed<k>/ (metrics.jsonl, log.txt, ...).
Finished runs are skipped, interrupted ones resume from their last checkpoint, a failing run
does not stop the others. `--max_minutes` stops everything in time for a command limit: run
the same command again to continue. On CPU each worker gets one XLA thread (--jobs = cores);
on a GPU (`--no_single_thread`) the workers share it without preallocating its memory.
"""

from __future__ import annotations

import argparse
import sys

from dynamo_jax import analysis


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument(
        "--variants",
        default=",".join(analysis.DEFAULT_VARIANTS),
        help=f"comma-separated, from {sorted(analysis.VARIANTS)}",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated RL seeds")
    p.add_argument("--steps", type=int, default=None, help="RL steps (default: the config's)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.add_argument("--config", default=analysis.DEFAULT_CONFIG, help="base config file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="extra override for every run, e.g. --set eval.every=25 (repeatable)",
    )
    p.add_argument(
        "--no_single_thread",
        action="store_true",
        help="do not restrict XLA to one CPU thread per worker (GPU/TPU, or --jobs 1)",
    )
    p.add_argument("--max_minutes", type=float, default=None, help="stop (resumably) after this")
    p.add_argument(
        "--warm_start_only",
        action="store_true",
        help="only run the shared warm start into OUT/_sft (for experiments.report i/iv)",
    )
    args = p.parse_args(argv)
    extra = analysis.parse_overrides(args.set)
    if args.warm_start_only:
        sft = analysis.ensure_warm_start(args.out, args.config, extra)
        print(sft or "warm start failed")
        return 0 if sft else 1

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in analysis.VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(analysis.VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    status = analysis.run_sweep(
        args.out,
        variants,
        seeds,
        args.steps,
        jobs=args.jobs,
        extra=extra,
        config_path=args.config,
        single_thread=not args.no_single_thread,
        max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
    )
    width = max((len(k) for k in status), default=0)
    for name, result in status.items():
        print(f"{name:<{width}}  {result}")
    failed = [k for k, v in status.items() if v.startswith("failed")]
    pending = [k for k, v in status.items() if v in ("stopped", "not started")]
    if pending:
        print(f"{len(pending)} runs not finished: run the same command again to continue.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
