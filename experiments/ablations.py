"""DynaMO ablation sweep on the embedded task: every variant x seed, resumable.

    python -m experiments.ablations --out runs/ablations --seeds 0,1,2 --steps 300 --jobs 16
    python -m experiments.report --out runs/ablations   # plots + tables

Variants (`dynamo_jax.analysis.VARIANTS`, all overrides of configs/arith_tiny.py): dynamo,
grpo (uniform, no modulation, eps_high 0.2), alloc_only, modulation_only, comp_only, stab_only,
clip_higher (GRPO with DynaMO's eps_high 0.28; every ablation keeps 0.28).

The supervised warm start runs once into OUT/_sft and is copied into every run; each run is an
`experiments.train` subprocess writing OUT/<variant>/seed<k>/ (metrics.jsonl, log.txt, ...).
Finished runs are skipped, interrupted ones resume from their last checkpoint, a failing run
does not stop the others (the exit status is then 1). Every run's config (--config, --set,
--steps) is validated before anything starts. `--max_minutes` stops everything in time for a
command limit: run the same command again to continue. On CPU each worker gets one XLA
thread (--jobs = cores); on a GPU (`--no_single_thread`) the workers share it without
preallocating its memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from dynamo_jax import analysis

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _one_line(err: Exception) -> str:
    """A ConfigError's "Invalid config:\n  - a\n  - b" as "a b"."""
    lines = [line.strip().removeprefix("- ") for line in str(err).splitlines() if line.strip()]
    return " ".join(line for line in lines if line != "Invalid config:")


def check_configs(
    config_path: str, variants: list[str], seeds: list[int], steps: int | None, extra: Mapping
) -> str | None:
    """Builds and validates the warm start's and every variant's config before anything runs;
    returns a one-line error naming the flag and field, or None. (A bad --config/--set/--steps
    would otherwise only show up in OUT/_sft/log.txt.)"""
    from dynamo_jax import config as config_lib

    try:
        base = analysis.load_base_config(config_path)
    except (OSError, AttributeError) as err:
        return f"--config {config_path}: cannot load it ({err}); give a config file path"
    tree = base.to_dict()
    for key, value in extra.items():
        missing = config_lib.unknown_field(tree, key, prefix="--set ")
        if missing:
            return f"--set {key}={value}: {missing}"
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        if isinstance(node, dict):
            return f"--set {key}={value}: {key} is a section; set one of its fields {sorted(node)}"
        try:
            analysis._set(base.copy_and_resolve_references(), key, value)
        except (TypeError, ValueError):
            kind = _KINDS.get(type(node), type(node).__name__)
            return f"--set {key}={value}: expected {kind} (the config has {key}={node!r})"
    config = base.copy_and_resolve_references()  # the warm start's
    for key, value in {**dict(extra), "train.num_steps": 0}.items():
        analysis._set(config, key, value)
    flags = " ".join([*(f"--set {k}={v}" for k, v in extra.items())])
    flags += f" --steps {steps}" if steps is not None else ""
    given = f"{config_path} with {flags.strip()}" if flags else config_path
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as err:
        return f"invalid config ({given}): {_one_line(err)}"
    for v in variants:
        try:
            analysis.variant_config(v, seeds[0] if seeds else 0, steps, extra, base)
        except config_lib.ConfigError as err:
            return f"invalid config for variant {v} ({given}): {_one_line(err)}"
    return None


def _last_attempt(log_path: str) -> str:
    """The part of a run's log.txt written by its last attempt ("" if there is none)."""
    try:
        text = open(log_path, errors="replace").read()
    except OSError:
        return ""
    return text[text.rfind("\n$ ") :]


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
    for item in args.set:
        if "=" not in item or not item.partition("=")[0].strip():
            p.error(f"--set {item}: expected FIELD=VALUE, e.g. --set eval.every=25")
    extra = analysis.parse_overrides(args.set)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in analysis.VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(analysis.VARIANTS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds}: expected comma-separated integers, e.g. --seeds 0,1,2")
    if not seeds and not args.warm_start_only:
        p.error("--seeds: give at least one integer seed, e.g. --seeds 0,1,2")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: must be >= 1")
    problem = check_configs(
        args.config, [] if args.warm_start_only else variants, seeds, args.steps, extra
    )
    if problem:
        p.error(problem)

    sft_dir = os.path.join(os.path.abspath(args.out), analysis.SFT_DIRNAME)
    sft_log = os.path.join(sft_dir, "log.txt")
    if args.warm_start_only:
        sft = analysis.ensure_warm_start(args.out, args.config, extra)
        if sft:
            print(sft)
            return 0
        print(f"warm start failed: see {sft_log}", file=sys.stderr)
        return 1

    t0 = time.time()
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
    warm_failed = (
        "not started" in status.values()
        and not os.path.exists(os.path.join(sft_dir, "sft_model", "config.json"))
        and "stopped at the time limit" not in _last_attempt(sft_log)
        and (args.max_minutes is None or time.time() - t0 < 60 * args.max_minutes)
    )
    if warm_failed:
        failed.append(analysis.SFT_DIRNAME)
        logs = [sft_log]
    else:
        logs = [os.path.join(args.out, *k.split("/"), "log.txt") for k in failed]
    config_error = any("Invalid config" in _last_attempt(path) for path in logs)
    if failed:
        what = "the warm start" if warm_failed else f"{len(failed)} runs"
        shown = " ".join(logs[:3]) + (" ..." if len(logs) > 3 else "")
        print(f"{what} failed: see {shown}", file=sys.stderr)
        if config_error:
            print("The config is invalid (see the log): fix --config/--set first.", file=sys.stderr)
        else:
            print(
                "Fix the cause, then run the same command again (finished runs are skipped).",
                file=sys.stderr,
            )
    elif pending:
        print(f"{len(pending)} runs not finished: run the same command again to continue.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
