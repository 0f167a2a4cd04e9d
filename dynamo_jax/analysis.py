"""Ablations and measurements of DynaMO's two mechanisms (issue #6). Host-side glue + plots.

Everything the notebooks (`notebooks/ablations.ipynb`, `notebooks/allocation.ipynb`), the sweep
(`python -m experiments.ablations`) and the report (`python -m experiments.report`) compute
lives here, so nothing lives only in a notebook:

- **Variants** (`VARIANTS`, `variant_config`, `variant_flags`): DynaMO and its ablations as
  config overrides of `configs/arith_tiny.py`.
- **Sweep** (`plan_sweep`, `run_sweep`, `run_is_done`, `prepare_run_dir`): one supervised warm
  start shared by every run, each run a subprocess of `experiments.train` with its own log,
  resumable (finished runs are skipped; killed runs resume from their checkpoint).
- **Reading runs** (`load_sweep`, `aggregate`, `read_allocation_histograms`).
- **Controlled allocation experiment** (`controlled_allocation_experiment`): per-prompt softmax
  bandits with exact gradient variances, so the estimator variance of any allocation is known in
  closed form and the optimum is computable; empirical variance from many draws is compared.
- **Policy-gradient covariance on the embedded task** (`pg_covariance_experiment`): trace of
  the covariance of the real policy gradient of the warm-started model under each allocation at
  equal budget, from independent draws.
- **Entropy-change prediction** (`entropy_change_experiment`): SPEC 2.2's per-token estimate
  (sequence and vocab expectations) against the entropy change measured after an update, by
  Spearman rank correlation (`spearman`).
- **Plots** (matplotlib, Agg backend): `plot_*`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dynamo_jax import allocation as alloc_lib

# --------------------------------------------------------------------------------------------
# Variants (config overrides of configs/arith_tiny.py)
# --------------------------------------------------------------------------------------------

# Every ablation keeps DynaMO's eps_high = 0.28 (clip-higher, what the official runs used), so
# that each one differs from DynaMO only in the mechanism it removes. GRPO is the paper's
# baseline and uses eps_high = 0.2; `clip_higher` (all of DynaMO's mechanisms off, eps_high
# 0.28) is the control that separates the clip range from the mechanisms.
_UNIFORM = {"allocation.mode": "uniform"}
_NO_COMP = {"modulation.comp": False}
_NO_STAB = {"modulation.stab": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "dynamo": {},
    "grpo": {**_UNIFORM, **_NO_COMP, **_NO_STAB, "loss.eps_high": 0.2},
    "alloc_only": {**_NO_COMP, **_NO_STAB},
    "modulation_only": {**_UNIFORM},
    "comp_only": {**_UNIFORM, **_NO_STAB},
    "stab_only": {**_UNIFORM, **_NO_COMP},
    "clip_higher": {**_UNIFORM, **_NO_COMP, **_NO_STAB},
}
ISSUE_VARIANTS = ("dynamo", "grpo", "alloc_only", "modulation_only", "comp_only", "stab_only")
DEFAULT_VARIANTS = (*ISSUE_VARIANTS, "clip_higher")
VARIANT_LABELS = {
    "dynamo": "DynaMO",
    "grpo": "GRPO (eps_high 0.2)",
    "alloc_only": "allocation only",
    "modulation_only": "modulation only",
    "comp_only": "compensation only",
    "stab_only": "stabilisation only",
    "clip_higher": "GRPO + clip-higher (0.28)",
}
DEFAULT_CONFIG = "configs/arith_tiny.py"


def _set(config: Any, dotted: str, value: Any) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """["train.num_steps=100", "modulation.comp=false"] -> {"train.num_steps": 100, ...}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected field=value")
        out[key.strip()] = _parse_value(raw.strip())
    return out


def _parse_value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def load_base_config(path: str = DEFAULT_CONFIG) -> Any:
    """`get_config()` of a config file (path relative to the repository root or absolute)."""
    import importlib.util

    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), path)
    spec = importlib.util.spec_from_file_location("_dynamo_analysis_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def variant_overrides(
    variant: str, seed: int, steps: int | None = None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """All overrides of one run: the variant's, the seed, the step count, then `extra`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    out: dict[str, Any] = {**VARIANTS[variant], "seed": int(seed)}
    if steps is not None:
        out["train.num_steps"] = int(steps)
    out.update(extra or {})
    return out


def variant_config(
    variant: str,
    seed: int = 0,
    steps: int | None = None,
    extra: Mapping[str, Any] | None = None,
    base: str | Any = DEFAULT_CONFIG,
) -> Any:
    """The ConfigDict of one run (validated)."""
    from dynamo_jax import config as config_lib

    config = load_base_config(base) if isinstance(base, str) else base.copy_and_resolve_references()
    for key, value in variant_overrides(variant, seed, steps, extra).items():
        _set(config, key, value)
    config_lib.validate(config)
    return config


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def variant_flags(overrides: Mapping[str, Any]) -> list[str]:
    """Overrides as `experiments.train` flags (`--config.a.b=value`)."""
    return [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]


# --------------------------------------------------------------------------------------------
# Sweep: one warm start, many resumable runs in worker subprocesses
# --------------------------------------------------------------------------------------------

# One XLA CPU thread pool per process: J processes on J cores do not oversubscribe.
SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
SFT_DIRNAME = "_sft"


@dataclasses.dataclass
class Run:
    variant: str
    seed: int
    workdir: str
    overrides: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.variant}/seed{self.seed}"


def plan_sweep(
    out_dir: str,
    variants: Sequence[str],
    seeds: Sequence[int],
    steps: int | None,
    extra: Mapping[str, Any] | None = None,
) -> list[Run]:
    """Runs of the sweep, seed-major (every variant's seed 0 first) so that a sweep cut short
    still has every variant."""
    runs = []
    for seed in seeds:
        for v in variants:
            workdir = os.path.join(out_dir, v, f"seed{seed}")
            runs.append(Run(v, int(seed), workdir, variant_overrides(v, seed, steps, extra)))
    return runs


def run_is_done(workdir: str, steps: int | None = None) -> bool:
    """A run is finished when its summary.json records the final held-out accuracy (and the
    requested number of steps)."""
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return False
    try:
        summary = json.load(open(path))
    except (OSError, json.JSONDecodeError):
        return False
    if summary.get("heldout_accuracy_after") is None:
        return False
    return steps is None or int(summary.get("steps", -1)) == int(steps)


def prepare_run_dir(workdir: str, sft_workdir: str) -> None:
    """Copies the cached warm start (`sft_model/`) and the tokenizer into a run's work dir.

    `trainer.build_model` reuses `WORKDIR/sft_model` whenever its config.json exists (it does
    not compare configs), and `trainer.build_task` reuses `WORKDIR/tokenizer/arith_sp.model`;
    both are copied so every run starts from exactly the same weights and vocabulary. Only
    valid when the runs share the warm start's model, data and sft settings (variants and
    seeds do: `seed` changes RL sampling and shuffling; the warm start was made with the
    base config's seed).
    """
    os.makedirs(workdir, exist_ok=True)
    for sub in ("sft_model", "tokenizer"):
        src, dst = os.path.join(sft_workdir, sub), os.path.join(workdir, sub)
        if not os.path.exists(src):
            raise FileNotFoundError(f"{src} is missing: run the warm start first")
        if not os.path.exists(dst):
            shutil.copytree(src, dst + ".tmp", dirs_exist_ok=True)
            os.replace(dst + ".tmp", dst)


def worker_env(
    base: Mapping[str, str] | None = None, single_thread: bool = True, cache_dir: str = ""
) -> dict[str, str]:
    """Environment of a sweep worker: one XLA CPU thread (CPU sweeps), no GPU preallocation
    (several workers share one GPU), a shared persistent compilation cache."""
    env = dict(os.environ if base is None else base)
    flags = env.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
    if single_thread:
        flags = f"{flags} {SINGLE_THREAD_XLA_FLAGS}".strip()
    env["XLA_FLAGS"] = flags
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1" if single_thread else env.get("OMP_NUM_THREADS", ""))
    if not env["OMP_NUM_THREADS"]:
        del env["OMP_NUM_THREADS"]
    if cache_dir:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return env


def train_command(
    workdir: str, overrides: Mapping[str, Any], config_path: str = DEFAULT_CONFIG
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "--config",
        config_path,
        "--workdir",
        workdir,
        "--noprogress",
        *variant_flags(overrides),
    ]


def _run_subprocess(cmd: list[str], log_path: str, env: Mapping[str, str], deadline: float | None):
    """Runs `cmd` with stdout+stderr appended to `log_path`; SIGTERM then SIGKILL at the
    deadline (the run resumes from its last checkpoint next time). Returns the exit code."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True
        )
        while True:
            try:
                timeout = None if deadline is None else max(deadline - time.time(), 0.0)
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                log.write("\n[sweep] stopped at the time limit; run again to resume\n")
                return None


def ensure_warm_start(
    out_dir: str,
    config_path: str = DEFAULT_CONFIG,
    extra: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> str | None:
    """Runs the supervised warm start once into OUT/_sft (an `experiments.train` run with 0 RL
    steps) and returns that work dir, or None if it failed or ran out of time."""
    sft_dir = os.path.join(out_dir, SFT_DIRNAME)
    if os.path.exists(os.path.join(sft_dir, "sft_model", "config.json")):
        return sft_dir
    overrides = {**dict(extra or {}), "train.num_steps": 0}
    log(f"[sweep] warm start -> {sft_dir} (log: {sft_dir}/log.txt)")
    rc = _run_subprocess(
        train_command(sft_dir, overrides, config_path),
        os.path.join(sft_dir, "log.txt"),
        env or worker_env(single_thread=False),
        deadline,
    )
    if os.path.exists(os.path.join(sft_dir, "sft_model", "config.json")):
        return sft_dir
    log(f"[sweep] warm start failed (exit {rc}); see {sft_dir}/log.txt")
    return None


def run_sweep(
    out_dir: str,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int | None = None,
    jobs: int = 1,
    extra: Mapping[str, Any] | None = None,
    config_path: str = DEFAULT_CONFIG,
    single_thread: bool = True,
    max_seconds: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Runs (or resumes) the sweep; returns {run name: "done" | "skipped" | "failed (rc)" |
    "stopped" | "not started"}. One failing run never stops the others; each run logs to
    WORKDIR/log.txt. `extra` overrides apply to every run (and to the warm start)."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    deadline = None if not max_seconds else time.time() + max_seconds
    cache = os.path.join(out_dir, ".jax_cache")
    env = worker_env(single_thread=single_thread, cache_dir=cache)
    runs = plan_sweep(out_dir, variants, seeds, steps, extra)
    status: dict[str, str] = {}
    todo = []
    for r in runs:
        if run_is_done(r.workdir, steps):
            status[r.name] = "skipped"
        else:
            todo.append(r)
    log(f"[sweep] {len(runs)} runs, {len(runs) - len(todo)} already finished, jobs={jobs}")
    if not todo:
        return status
    sft_dir = ensure_warm_start(
        out_dir,
        config_path,
        extra,
        worker_env(single_thread=False, cache_dir=cache),
        deadline,
        log,
    )
    if sft_dir is None:
        return {**status, **{r.name: "not started" for r in todo}}

    def one(r: Run) -> str:
        if deadline is not None and time.time() >= deadline:
            return "not started"
        try:
            prepare_run_dir(r.workdir, sft_dir)
        except OSError as err:
            return f"failed ({err})"
        t0 = time.time()
        rc = _run_subprocess(
            train_command(r.workdir, r.overrides, config_path),
            os.path.join(r.workdir, "log.txt"),
            env,
            deadline,
        )
        if rc is None:
            result = "stopped"
        elif rc == 0 and run_is_done(r.workdir, steps):
            result = "done"
        else:
            result = f"failed (exit {rc}; see {r.workdir}/log.txt)"
        log(f"[sweep] {r.name}: {result} in {time.time() - t0:.0f} s")
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for r, result in zip(todo, pool.map(one, todo), strict=True):
            status[r.name] = result
    return status


def run_in_process(
    variant: str,
    seed: int,
    workdir: str,
    sft_workdir: str | None = None,
    steps: int | None = None,
    extra: Mapping[str, Any] | None = None,
    base: str | Any = DEFAULT_CONFIG,
) -> dict[str, Any]:
    """One run in this process (notebooks): copies the warm start if given, trains (resumes)."""
    from dynamo_jax import trainer

    config = variant_config(variant, seed, steps, extra, base)
    if sft_workdir is not None:
        prepare_run_dir(workdir, sft_workdir)
    summary = trainer.train(config, workdir, progress=False, log=lambda _: None)
    summary.pop("final_state", None)
    return summary


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    from dynamo_jax.metrics import read_jsonl

    return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def load_sweep(out_dir: str) -> dict[str, dict[int, dict[str, Any]]]:
    """{variant: {seed: {"metrics": [...], "summary": {...}, "workdir": str}}} for every run
    directory OUT/<variant>/seed<k> that has metrics."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    if not os.path.isdir(out_dir):
        return runs
    for variant in sorted(os.listdir(out_dir)):
        vdir = os.path.join(out_dir, variant)
        if variant.startswith(("_", ".")) or not os.path.isdir(vdir):
            continue
        for name in sorted(os.listdir(vdir)):
            if not name.startswith("seed"):
                continue
            workdir = os.path.join(vdir, name)
            metrics = read_metrics(workdir)
            if not metrics:
                continue
            spath = os.path.join(workdir, "summary.json")
            summary = json.load(open(spath)) if os.path.exists(spath) else {}
            runs.setdefault(variant, {})[int(name[4:])] = {
                "metrics": metrics,
                "summary": summary,
                "workdir": workdir,
            }
    return runs


def series(
    metrics: Sequence[Mapping[str, Any]], key: str, rollouts_per_step: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one metric over the steps where it was logged; x = step + 1 (steps done), or
    the cumulative rollouts (step + 1) * B when `rollouts_per_step` is given."""
    pts = [(r["step"] + 1, r[key]) for r in metrics if r.get(key) is not None]
    x = np.array([p[0] for p in pts], np.float64)
    y = np.array([p[1] for p in pts], np.float64)
    if rollouts_per_step:
        x = x * rollouts_per_step
    return x, y


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (window <= 1: unchanged)."""
    y = np.asarray(y, np.float64)
    if window <= 1 or y.size == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = np.empty_like(y)
    for i in range(y.size):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def aggregate(
    per_seed: Mapping[int, Mapping[str, Any]],
    key: str,
    rollouts_per_step: int | None = None,
    with_before: bool = False,
) -> dict[str, np.ndarray]:
    """Mean, std, min, max over seeds on the x values every seed has. With `with_before`, the
    held-out accuracy before RL (summary) is prepended at x = 0."""
    curves = []
    for run in per_seed.values():
        x, y = series(run["metrics"], key, rollouts_per_step)
        before = run.get("summary", {}).get("heldout_accuracy_before")
        if with_before and before is not None:
            x, y = np.insert(x, 0, 0.0), np.insert(y, 0, before)
        curves.append(dict(zip(x.tolist(), y.tolist(), strict=True)))
    if not curves:
        return {k: np.zeros(0) for k in ("x", "mean", "std", "min", "max", "n")}
    common = sorted(set.intersection(*(set(c) for c in curves)))
    ys = np.array([[c[x] for x in common] for c in curves], np.float64).reshape(len(curves), -1)
    return {
        "x": np.array(common, np.float64),
        "mean": ys.mean(0),
        "std": ys.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(common)),
        "min": ys.min(0),
        "max": ys.max(0),
        "n": np.full(len(common), len(curves)),
    }


def paired_difference(
    values: Mapping[int, float], reference: Mapping[int, float]
) -> dict[str, float]:
    """Mean difference values - reference over the seeds both have, paired by seed (a seed
    gives every variant the same random seeds, hence the same held-out value before RL), with
    its standard error std(d, ddof=1) / sqrt(n), the paired t statistic, its two-sided p-value
    (Student's t with n - 1 degrees of freedom) and how many seeds are below the reference.
    Fewer than two common seeds: the s.e., t and p are NaN. No correction for multiple
    comparisons."""
    from scipy import stats

    seeds = sorted(set(values) & set(reference))
    d = np.array([values[s] - reference[s] for s in seeds], np.float64)
    out = {
        "n": float(d.size),
        "mean": float(d.mean()) if d.size else float("nan"),
        "se": float("nan"),
        "t": float("nan"),
        "p": float("nan"),
        "below": float(np.sum(d < 0)),
    }
    if d.size > 1:
        se = float(d.std(ddof=1) / np.sqrt(d.size))
        out["se"] = se
        if se > 0:
            out["t"] = float(d.mean() / se)
            out["p"] = float(2 * stats.t.sf(abs(out["t"]), d.size - 1))
        else:
            out["t"] = 0.0 if d.mean() == 0 else float(np.sign(d.mean()) * np.inf)
            out["p"] = 1.0 if d.mean() == 0 else 0.0
    return out


def _tfrecords(path: str) -> Iterable[bytes]:
    with open(path, "rb") as f:
        while True:
            header = f.read(8)
            if len(header) < 8:
                return
            (length,) = struct.unpack("<Q", header)
            f.read(4)  # length crc
            data = f.read(length)
            f.read(4)  # data crc
            if len(data) < length:
                return
            yield data


def read_allocation_histograms(workdir: str, tag: str = "allocation") -> dict[int, np.ndarray]:
    """{step: group sizes} per step.

    Uses the per-step `allocation` list in metrics.jsonl when the trainer writes one; otherwise
    reads the TensorBoard histogram of the group sizes (tensorboardX protobufs). TensorBoard's
    buckets grow by 10%: sizes up to 10 come back exactly; larger ones can share a bucket with
    a neighbour, and the split is recovered from the histogram's exact sum and sum of squares
    (`_histogram_integers`)."""
    out: dict[int, np.ndarray] = {}
    for r in read_metrics(workdir):
        if isinstance(r.get("allocation"), list):
            out[int(r["step"])] = np.asarray(r["allocation"], np.int64)
    if out:
        return out
    from tensorboardX.proto import event_pb2

    tb = os.path.join(workdir, "tensorboard")
    if not os.path.isdir(tb):
        return out
    for name in sorted(os.listdir(tb)):
        if "tfevents" not in name:
            continue
        for data in _tfrecords(os.path.join(tb, name)):
            ev = event_pb2.Event.FromString(data)
            for v in ev.summary.value:
                if v.tag != tag or not v.HasField("histo"):
                    continue
                out[int(ev.step)] = _histogram_integers(v.histo)
    return out


def _histogram_integers(h: Any) -> np.ndarray:
    """The integer values behind a TensorBoard HistogramProto of small integers.

    Buckets are (previous limit, limit]. A bucket holding one integer is exact; where two
    integers share a bucket (sizes above ~10), the split is the one that reproduces the
    histogram's exact sum and sum of squares (searched; an even split if none is found). Where
    several splits reproduce both, the first found is returned, which can be the wrong one (17
    of 300 random allocations of 1-24 rollouts in one check): a fallback for runs whose
    metrics.jsonl lacks the exact `allocation` lists, which the trainer writes."""
    limits = np.asarray(h.bucket_limit, np.float64)
    counts = np.rint(np.asarray(h.bucket, np.float64)).astype(np.int64)
    lower = np.concatenate([[-np.inf], limits[:-1]])
    fixed: list[int] = []
    shared: list[tuple[np.ndarray, int]] = []
    for lo, hi, c in zip(lower, limits, counts, strict=True):
        if c <= 0:
            continue
        first, last = max(np.floor(lo) + 1, np.ceil(h.min)), min(np.floor(hi), h.max)
        cands = np.arange(first, last + 1).astype(np.int64)
        if cands.size == 0:
            cands = np.array([int(round(np.clip(0.5 * (lo + hi), h.min, h.max)))])
        if cands.size == 1:
            fixed += [int(cands[0])] * int(c)
        else:
            shared.append((cands, int(c)))
    # Unknown: how many of each shared bucket's count sit on each candidate.
    rest_sum = round(h.sum) - sum(fixed)
    rest_sq = round(h.sum_squares) - sum(v * v for v in fixed)
    options = []
    for cands, c in shared:
        opts = []
        for split in _compositions(c, cands.size):
            vals = np.repeat(cands, split)
            opts.append((int(vals.sum()), int((vals * vals).sum()), vals))
        options.append(opts)
    best = _match_sums(options, rest_sum, rest_sq)
    if best is None:
        best = [np.resize(cands, c) for cands, c in shared]
    values = np.concatenate([np.asarray(fixed, np.int64), *best]) if shared else fixed
    return np.sort(np.asarray(values, np.int64))


def _compositions(total: int, parts: int) -> Iterable[tuple[int, ...]]:
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def _match_sums(options, target_sum: int, target_sq: int, limit: int = 200_000):
    """A choice of one option per bucket whose sums hit both targets (depth-first), or None."""
    count = [0]

    def go(i, s, q):
        count[0] += 1
        if count[0] > limit:
            return None
        if i == len(options):
            return [] if (s == target_sum and q == target_sq) else None
        for os_, oq, vals in options[i]:
            found = go(i + 1, s + os_, q + oq)
            if found is not None:
                return [vals, *found]
        return None

    return go(0, 0, 0)


def allocation_matrix(hists: Mapping[int, np.ndarray], n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps, counts[step, n]) = prompts that got n rollouts at each step, n in 0..n_max."""
    steps = np.array(sorted(hists), np.int64)
    mat = np.zeros((len(steps), n_max + 1), np.int64)
    for i, s in enumerate(steps):
        v = np.clip(hists[int(s)], 0, n_max)
        mat[i] = np.bincount(v, minlength=n_max + 1)[: n_max + 1]
    return steps, mat


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def rankdata(x: Any) -> np.ndarray:
    """Ranks 1..n, ties get the average rank (as scipy.stats.rankdata(method="average"))."""
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, np.float64)
    sx = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN if either input is
    constant or has fewer than 2 points."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in size: {x.size} vs {y.size}")
    if x.size < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
    return float(np.sum(rx * ry) / den) if den > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# Controlled allocation experiment (softmax bandits, exact variances)
# --------------------------------------------------------------------------------------------


def bandit_policy(p_correct: float, num_answers: int) -> np.ndarray:
    """A prompt as a softmax bandit: answer 0 is correct with probability p, the wrong answers
    share 1 - p equally. Returns pi [K]."""
    pi = np.full(num_answers, (1.0 - p_correct) / (num_answers - 1))
    pi[0] = p_correct
    return pi


def bandit_gradients(pi: np.ndarray, correct: int = 0) -> np.ndarray:
    """Per-answer REINFORCE gradient w.r.t. the logits, g(a) = (R(a) - b) (e_a - pi), reward
    +1 / -1, exact baseline b = E[R]. Returns [K answers, K logits]."""
    k = pi.size
    reward = np.where(np.arange(k) == correct, 1.0, -1.0)
    baseline = float(np.dot(pi, reward))
    return (reward - baseline)[:, None] * (np.eye(k) - pi[None, :])


def bandit_gradient_variance(pi: np.ndarray, correct: int = 0) -> float:
    """sigma^2 = E||g - E g||^2 of one rollout's gradient (exact, by enumerating the answers)."""
    g = bandit_gradients(pi, correct)
    mean = pi @ g
    return float(pi @ np.sum(g * g, axis=1) - mean @ mean)


def estimator_variance(sigma2: Any, n: Any) -> float:
    """Trace of the covariance of g_hat = (1/N) sum_i (1/n_i) sum_j g_ij (independent prompts,
    i.i.d. rollouts): (1/N^2) sum_i sigma_i^2 / n_i."""
    s, n = np.asarray(sigma2, np.float64), np.asarray(n, np.float64)
    return float(np.sum(s / n) / s.size**2)


def empirical_estimator_variance(
    policies: Sequence[np.ndarray], n: Sequence[int], draws: int, rng: np.random.Generator
) -> tuple[float, float]:
    """(trace of the sample covariance of g_hat over `draws` independent batches, its standard
    error). Each batch samples n_i answers per prompt and averages their gradients."""
    N = len(policies)
    sq = np.zeros(draws)
    blocks = []
    for pi, n_i in zip(policies, n, strict=True):
        g = bandit_gradients(pi)
        answers = rng.choice(pi.size, size=(draws, int(n_i)), p=pi)
        blocks.append(g[answers].mean(axis=1) / N)  # [draws, K]
    est = np.concatenate(blocks, axis=1)  # [draws, sum K]
    dev = est - est.mean(axis=0, keepdims=True)
    sq = np.sum(dev * dev, axis=1) * draws / (draws - 1)
    return float(sq.mean()), float(sq.std(ddof=1) / np.sqrt(draws))


DEFAULT_P_CORRECT = (0.0,) * 3 + (1.0,) * 3 + (0.05, 0.15, 0.3, 0.5, 0.5, 0.7, 0.85, 0.9, 0.95)
DEFAULT_P_CORRECT += (0.99,)


def controlled_allocation_experiment(
    p_correct: Sequence[float] | None = None,
    rollouts_per_prompt: int = 8,
    n_low: int = 2,
    n_high: int = 24,
    num_answers: int = 4,
    history: int = 16,
    draws: int = 2000,
    seed: int = 0,
    history_draws: int = 200,
) -> dict[str, Any]:
    """Estimator variance under several allocations at equal budget B = N * n.

    Each prompt is a softmax bandit (`bandit_policy`) whose single-rollout gradient variance
    sigma_i^2 is known exactly, so Var(g_hat) = sum_i sigma_i^2 / n_i / N^2 for any allocation
    (`estimator_variance`). Allocations compared:
      uniform; variance (weight exponent 1, the paper's P_i) and variance_sqrt (exponent 0.5,
      Neyman on the Bernoulli std), both from the Bernoulli variance of `history` simulated
      earlier rollouts per prompt (what the trainer sees); official (same history);
      variance_true_p / variance_sqrt_true_p: the same rules with the true p (infinite
      history), separating the proxy's shape from its estimation noise;
      oracle: the exact integer minimiser with the true sigma_i (`allocate_rollouts` with
      weights sigma_i minimises sum sigma_i^2 / n_i); continuous: the water-level optimum with
      the true sigma_i (a lower bound on every integer allocation within the bounds);
      unbounded: (sum sigma_i)^2 / (N^2 B), the optimum without bounds.
    Every allocation's variance is computed analytically and measured from `draws` batches.
    """
    rng = np.random.default_rng(seed)
    if p_correct is None:  # like a real batch: some never / always solved, the rest spread
        p_correct = DEFAULT_P_CORRECT
    p = np.clip(np.asarray(p_correct, np.float64), 0.0, 1.0)
    N = p.size
    B = N * rollouts_per_prompt
    policies = [bandit_policy(float(x), num_answers) for x in p]
    sigma2 = np.array([bandit_gradient_variance(pi) for pi in policies])
    sigma = np.sqrt(sigma2)
    k_hist = rng.binomial(history, p).astype(np.float64)
    G_hist = np.full(N, float(history))
    alloc: dict[str, np.ndarray] = {
        "uniform": alloc_lib.allocate_rollouts(
            np.ones(N), B, n_low, n_high, mode="uniform", rollouts_per_prompt=rollouts_per_prompt
        )
    }
    for name, gamma in (("variance", 1.0), ("variance_sqrt", 0.5)):
        w = alloc_lib.allocation_weights(k_hist, G_hist, weight_exponent=gamma)
        alloc[name] = alloc_lib.allocate_rollouts(w, B, n_low, n_high, mode="variance")
    alloc["official"] = alloc_lib.official_allocation(k_hist, G_hist, B, n_low, n_high)
    for name, gamma in (("variance_true_p", 1.0), ("variance_sqrt_true_p", 0.5)):
        w = (p * (1.0 - p)) ** gamma  # the proxy with an infinite history
        alloc[name] = alloc_lib.allocate_rollouts(w, B, n_low, n_high, mode="variance")
    alloc["oracle"] = alloc_lib.allocate_rollouts(sigma, B, n_low, n_high, mode="variance")
    continuous = alloc_lib.continuous_allocation(sigma, B, n_low, n_high)
    # The history-based rules depend on one simulated history: average their analytic
    # variance over `history_draws` fresh histories too.
    over_histories: dict[str, list[float]] = {"variance": [], "variance_sqrt": [], "official": []}
    for _ in range(history_draws):
        k_h = rng.binomial(history, p).astype(np.float64)
        for name, gamma in (("variance", 1.0), ("variance_sqrt", 0.5)):
            w = alloc_lib.allocation_weights(k_h, G_hist, weight_exponent=gamma)
            n_h = alloc_lib.allocate_rollouts(w, B, n_low, n_high, mode="variance")
            over_histories[name].append(estimator_variance(sigma2, n_h))
        n_h = alloc_lib.official_allocation(k_h, G_hist, B, n_low, n_high)
        over_histories["official"].append(estimator_variance(sigma2, n_h))
    rows = {}
    for name, n in alloc.items():
        emp, se = empirical_estimator_variance(policies, n, draws, rng)
        rows[name] = {
            "n": np.asarray(n),
            "analytic": estimator_variance(sigma2, n),
            "empirical": emp,
            "stderr": se,
        }
        if name in over_histories and over_histories[name]:
            v = np.asarray(over_histories[name])
            rows[name]["analytic_mean_over_histories"] = float(v.mean())
            # Monte Carlo standard error of that mean (NaN with a single history)
            rows[name]["analytic_se_over_histories"] = (
                float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
            )
    return {
        "p_correct": p,
        "sigma2": sigma2,
        "history_k": k_hist,
        "history_G": G_hist,
        "budget": B,
        "n_low": n_low,
        "n_high": n_high,
        "allocations": rows,
        "continuous_n": continuous,
        "continuous_optimum": estimator_variance(sigma2, continuous),
        "unbounded_optimum": float(sigma.sum() ** 2 / (N**2 * B)),
        "draws": draws,
    }


def controlled_vs_history(
    histories: Sequence[int] = (4, 8, 16, 32, 64, 256), **kwargs: Any
) -> dict[str, np.ndarray]:
    """Analytic variance relative to uniform, averaged over simulated histories, of the
    history-based rules as the history per prompt grows (`controlled_allocation_experiment`'s
    other arguments pass through, with the same number of histories by default, so the value
    at its history equals its table's; empirical draws are skipped). Returns {"history": [...],
    rule: ratios, ..., "se": {rule: Monte Carlo standard errors of the ratios}}."""
    kwargs = {"draws": 2, **kwargs}
    out: dict[str, Any] = {"history": list(histories), "se": {}}
    for h in histories:
        r = controlled_allocation_experiment(history=h, **kwargs)
        uni = r["allocations"]["uniform"]["analytic"]
        for name, row in r["allocations"].items():
            v = row.get("analytic_mean_over_histories", row["analytic"])
            out.setdefault(name, []).append(v / uni)
            out["se"].setdefault(name, []).append(row.get("analytic_se_over_histories", 0.0) / uni)
    return {
        k: ({kk: np.asarray(vv) for kk, vv in v.items()} if k == "se" else np.asarray(v))
        for k, v in out.items()
    }


def controlled_vs_history_table(curves: Mapping[str, Any]) -> str:
    """Markdown table of `controlled_vs_history` for the history-based rules: the variance
    relative to uniform +- its Monte Carlo standard error, per history length."""
    names = [n for n in ("variance", "variance_sqrt", "official") if n in curves]
    hist = [int(h) for h in curves["history"]]
    lines = [
        "| history per prompt | " + " | ".join(str(h) for h in hist) + " |",
        "|---|" + "---|" * len(hist),
    ]
    for n in names:
        se = curves.get("se", {}).get(n, np.zeros(len(hist)))
        cells = [f"{v:.3f} +- {e:.3f}" for v, e in zip(curves[n], se, strict=True)]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_controlled_vs_history(curves: Mapping[str, np.ndarray], path: str | None = None):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, y in curves.items():
        if name not in ("history", "se"):
            ax.errorbar(
                curves["history"],
                y,
                yerr=2 * np.asarray(curves.get("se", {}).get(name, np.zeros_like(y))),
                marker="o",
                ms=3,
                capsize=2,
                label=name,
            )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("history: rollouts seen per prompt")
    ax.set_ylabel("Var(g_hat) / Var(uniform), +- 2 s.e.")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def warm_start(sft_workdir: str, config: Any) -> str:
    """Runs (or reuses) the supervised warm start of `config` in this process into
    SFT_WORKDIR/sft_model (with SFT_WORKDIR/tokenizer); returns SFT_WORKDIR."""
    import jax

    from dynamo_jax import sharding as shd
    from dynamo_jax import trainer

    os.makedirs(sft_workdir, exist_ok=True)
    mesh = shd.make_mesh(data=-1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    task = trainer.build_task(config, sft_workdir)
    trainer.build_model(config, task, sft_workdir, mesh, lambda _: None)
    return sft_workdir


def controlled_table(result: Mapping[str, Any]) -> str:
    """Markdown table of `controlled_allocation_experiment`."""
    uni = result["allocations"]["uniform"]["analytic"]
    lines = [
        "| allocation | analytic Var | empirical Var (+- s.e.) | vs uniform "
        "| vs uniform, mean over histories |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["allocations"].items():
        mh = r.get("analytic_mean_over_histories")
        se = r.get("analytic_se_over_histories", float("nan"))
        lines.append(
            f"| {name} | {r['analytic']:.4g} | {r['empirical']:.4g} +- {r['stderr']:.2g} "
            f"| {r['analytic'] / uni:.3f} "
            f"| {'' if mh is None else f'{mh / uni:.3f} +- {se / uni:.3f}'} |"
        )
    for name in ("continuous_optimum", "unbounded_optimum"):
        v = result[name]
        lines.append(f"| {name.replace('_', ' ')} | {v:.4g} | | {v / uni:.3f} | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The embedded task's warm-started policy (for the covariance and entropy experiments)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Policy:
    config: Any
    task: Any
    graphdef: Any
    params: Any
    rest: Any
    sampler: Any
    mesh: Any


def load_policy(
    sft_workdir: str,
    config: Any | None = None,
    num_rows: int | None = None,
    require_cached: bool = True,
) -> Policy:
    """The warm-started model of a work dir holding `sft_model/` and `tokenizer/` (e.g. a
    sweep's OUT/_sft), with its task and a sampler for `num_rows` rows (default B). With
    `require_cached=False` a missing warm start is trained (and cached) first."""
    import jax

    from dynamo_jax import sharding as shd
    from dynamo_jax import train_step as ts
    from dynamo_jax import trainer

    config = config if config is not None else load_base_config()
    cached = os.path.exists(os.path.join(sft_workdir, "sft_model", "config.json"))
    if require_cached and not cached:
        raise FileNotFoundError(f"no sft_model/ in {sft_workdir}: run the warm start first")
    mesh = shd.make_mesh(data=-1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    task = trainer.build_task(config, sft_workdir)
    model, _ = trainer.build_model(config, task, sft_workdir, mesh, lambda _: None)
    rows = num_rows or config.prompts_per_step * config.rollouts_per_prompt
    sampler = trainer.make_sampler(config, model, task, num_rows=rows)
    graphdef, params, rest = ts.split_model(model)
    return Policy(config, task, graphdef, params, rest, sampler, mesh)


def _token_stats(policy: Policy, params: Any, batch: Mapping[str, Any], with_vocab: bool):
    from dynamo_jax import train_step as ts

    cfg = policy.config
    return ts.response_token_stats(
        policy.graphdef,
        params,
        policy.rest,
        batch,
        cfg.sampling.temperature,
        cfg.loss.logits_chunk_size,
        with_vocab,
    )


def sample_batch(
    policy: Policy, records: Sequence[Mapping[str, str]], n: np.ndarray, key: Any
) -> dict[str, np.ndarray]:
    """Samples n_i rollouts per record with the policy; returns the train-layout batch plus
    rewards, correct, group_ids, valid (as the trainer builds it)."""
    from dynamo_jax import trainer

    task, cfg = policy.task, policy.config
    prompts = [task.encode_prompt(r["prompt"]) for r in records]
    out = policy.sampler.generate(
        policy.params,
        prompts,
        np.arange(len(records)),
        np.asarray(n, np.int64),
        key,
        temperature=cfg.sampling.temperature,
    )
    correct, rewards = trainer.score_rollouts(task, cfg, list(records), out)
    valid = out.valid
    batch = trainer.rollout_batch(out, rewards, task.tokenizer.pad_id)
    batch["response_mask"] = batch["response_mask"] * valid[:, None]
    batch["correct"] = correct
    return batch


def _row_advantages(batch: Mapping[str, Any], num_groups: int, config: Any) -> np.ndarray:
    from dynamo_jax import advantages as adv_lib

    return np.asarray(
        adv_lib.group_advantages(
            batch["rewards"],
            batch["group_ids"],
            batch["valid"],
            num_groups,
            config.advantage.estimator,
            config.advantage.eps,
        )
    )


def zero_variance_share(correct: np.ndarray, group_ids: np.ndarray, valid: np.ndarray) -> float:
    """Share of valid rollouts whose group is all correct or all wrong."""
    g = group_ids[valid]
    c = correct[valid].astype(np.float64)
    if g.size == 0:
        return 0.0
    total = np.bincount(g)
    right = np.bincount(g, weights=c, minlength=total.size)
    zero = (right == 0) | (right == total)
    return float(np.mean(zero[g]))


def _make_grad_fn(policy: Policy, num_groups: int):
    """jit: (params, batch, row_weight[rows]) -> flat gradient of
    -sum_rows w_r sum_t A_r m_rt logp_rt (on-policy: ratio 1, so the clipped loss's gradient)."""
    import jax
    import jax.numpy as jnp

    def loss(params, batch, adv, row_weight):
        stats = _token_stats(policy, params, batch, False)
        per_row = jnp.sum(stats.logp * batch["response_mask"], axis=1)
        return -jnp.sum(row_weight * adv * per_row)

    @jax.jit
    def grad(params, batch, adv, row_weight):
        g = jax.grad(loss)(params, batch, adv, row_weight)
        return jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])

    return grad


ESTIMATORS = ("token_mean", "prompt_mean")


def _row_weights(batch: Mapping[str, np.ndarray], num_groups: int, estimator: str) -> np.ndarray:
    """Per-row weights of the two gradient estimators.

    token_mean (the trainer's loss_agg): every token weighs 1 / (tokens in the batch); prompts
      with more rollouts weigh more.
    prompt_mean (the estimator SPEC 1.3's variance argument is about): every prompt weighs
      1 / N and its rollouts share it, w_r = 1 / (N n_i |y_r|).
    """
    mask = batch["response_mask"]
    lengths = mask.sum(axis=1)
    valid = batch["valid"]
    if estimator == "token_mean":
        return (valid / max(mask.sum(), 1.0)).astype(np.float32)
    if estimator == "prompt_mean":
        n = np.bincount(batch["group_ids"][valid], minlength=num_groups).astype(np.float64)
        w = 1.0 / (num_groups * n[batch["group_ids"]] * np.maximum(lengths, 1.0))
        return np.where(valid, w, 0.0).astype(np.float32)
    raise ValueError(f"estimator {estimator!r}; choose from {ESTIMATORS}")


def pick_prompts(task: Any, num: int, seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(task.train), size=num, replace=False)
    return [task.train[int(i)] for i in idx]


PG_MODES = {
    "uniform": {"mode": "uniform"},
    "variance": {"mode": "variance", "weight_exponent": 1.0},
    "variance_sqrt": {"mode": "variance", "weight_exponent": 0.5},
    "official": {"mode": "official"},
}


def pg_allocations(
    config: Any, k: np.ndarray, G: np.ndarray, modes: Mapping[str, Mapping[str, Any]] = PG_MODES
) -> dict[str, np.ndarray]:
    """Group sizes per allocation mode from history (k, G), the config's budget and bounds."""
    N = k.size
    B = N * config.rollouts_per_prompt
    lo, hi = config.allocation.n_low, config.allocation.n_high
    out = {}
    for name, spec in modes.items():
        mode = spec["mode"]
        if mode == "official":
            out[name] = alloc_lib.official_allocation(k, G, B, lo, hi)
            continue
        w = alloc_lib.allocation_weights(
            k,
            G,
            min_history=config.allocation.min_history,
            weight_exponent=spec.get("weight_exponent", 1.0),
        )
        out[name] = alloc_lib.allocate_rollouts(
            w, B, lo, hi, mode=mode, rollouts_per_prompt=config.rollouts_per_prompt
        )
    return out


def pg_covariance_experiment(
    policy: Policy,
    draws: int = 50,
    num_prompts: int | None = None,
    history: int = 16,
    modes: Mapping[str, Mapping[str, Any]] = PG_MODES,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Trace of the covariance of the policy gradient at equal budget, per allocation mode.

    N prompts of the training set (default prompts_per_step); their history (k, G) comes from
    `history` rollouts each (rounded up to a multiple of rollouts_per_prompt) of the same
    policy (what the trainer knows after a pass); each
    mode's allocation n is fixed from it; then `draws` independent batches are sampled with n
    and the gradient of both estimators (`_row_weights`) is taken at the current parameters.
    Reports per mode and estimator: trace of the sample covariance (with a standard error over
    draws), the squared norm of the mean gradient, and their ratio (noise-to-signal), plus the
    share of rollouts in zero-variance groups.
    """
    import jax

    cfg = policy.config
    N = num_prompts or cfg.prompts_per_step
    records = pick_prompts(policy.task, N, seed)
    key = jax.random.key(seed)
    # History in rounds of B rows (the sampler's row bucket): rollouts_per_prompt per prompt.
    G, k = np.zeros(N), np.zeros(N)
    per_round = cfg.rollouts_per_prompt
    for h in range(-(-history // per_round)):
        hist = sample_batch(
            policy, records, np.full(N, per_round), jax.random.fold_in(key, 10_000_019 + h)
        )
        v = hist["valid"]
        G += np.bincount(hist["group_ids"][v], minlength=N)
        k += np.bincount(hist["group_ids"][v], weights=hist["correct"][v], minlength=N)
    allocs = pg_allocations(cfg, k, G, modes)
    grad_fn = _make_grad_fn(policy, N)
    results: dict[str, Any] = {}
    for mi, (name, n) in enumerate(allocs.items()):
        grads = {e: [] for e in ESTIMATORS}
        zero_var = []
        t0 = time.time()
        for d in range(draws):
            batch = sample_batch(policy, records, n, jax.random.fold_in(key, 1000 * mi + d))
            adv = _row_advantages(batch, N, cfg).astype(np.float32)
            model_in = {
                k_: batch[k_]
                for k_ in ("input_ids", "positions", "attention_mask", "targets", "response_mask")
            }
            for e in ESTIMATORS:
                w = _row_weights(batch, N, e)
                grads[e].append(np.asarray(grad_fn(policy.params, model_in, adv, w)))
            zero_var.append(
                zero_variance_share(batch["correct"], batch["group_ids"], batch["valid"])
            )
        row = {"n": np.asarray(n), "zero_variance_share": float(np.mean(zero_var))}
        for e in ESTIMATORS:
            g = np.stack(grads[e]).astype(np.float64)  # [draws, params]
            mean = g.mean(0)
            sq = np.sum((g - mean) ** 2, axis=1) * draws / (draws - 1)
            signal = float(mean @ mean)
            row[e] = {
                "trace": float(sq.mean()),
                "stderr": float(sq.std(ddof=1) / np.sqrt(draws)),
                "mean_sq_norm": signal,
                "noise_to_signal": float(sq.mean() / signal) if signal > 0 else float("nan"),
            }
        results[name] = row
        log(
            f"{name}: n={np.asarray(n).tolist()} trace(token_mean)="
            f"{row['token_mean']['trace']:.4g} trace(prompt_mean)={row['prompt_mean']['trace']:.4g}"
            f" ({time.time() - t0:.0f} s)"
        )
    return {
        "modes": results,
        "history_k": k,
        "history_G": G,
        "draws": draws,
        "num_prompts": N,
        "budget": int(N * cfg.rollouts_per_prompt),
    }


def pg_covariance_table(result: Mapping[str, Any]) -> str:
    modes = result["modes"]
    base = modes.get("uniform")
    lines = [
        "| allocation | n_i (min/max) | zero-var rollouts | trace Cov, token-mean (trainer) "
        "| vs uniform | trace Cov, prompt-mean | vs uniform | noise/signal, token-mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in modes.items():
        tm, pm = r["token_mean"], r["prompt_mean"]
        rel_t = tm["trace"] / base["token_mean"]["trace"] if base else float("nan")
        rel_p = pm["trace"] / base["prompt_mean"]["trace"] if base else float("nan")
        lines.append(
            f"| {name} | {int(r['n'].min())}/{int(r['n'].max())} "
            f"| {r['zero_variance_share']:.3f} "
            f"| {tm['trace']:.4g} +- {tm['stderr']:.2g} | {rel_t:.3f} "
            f"| {pm['trace']:.4g} +- {pm['stderr']:.2g} | {rel_p:.3f} "
            f"| {tm['noise_to_signal']:.3g} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Entropy-change prediction (SPEC 2.2) against the measured change
# --------------------------------------------------------------------------------------------


def entropy_change_experiment(
    policy: Policy,
    batches: int = 4,
    learning_rates: Sequence[float] = (1e-4, 1e-3),
    optimizer: str = "sgd",
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Does SPEC 2.2's per-token estimate dH predict the entropy change an update causes?

    For each of `batches` on-policy batches (uniform allocation, B rows) and each learning
    rate: the estimate dH per response token (sequence and vocab expectations; on-policy r = 1)
    is computed before the update; one optimiser update is taken on the (unmodulated,
    token-mean) GRPO loss of the whole batch; the measured change is H_after - H_before at the
    same positions (same contexts). Spearman rank correlations over the tokens with A != 0 (the
    estimate is 0 elsewhere): signed dH vs measured, and |dH| (Xi, what beta_stab ranks) vs
    |measured|. Two reference predictors with no model of the update: -A (signed) and H
    (magnitude: high-entropy tokens move more).

    optimizer: "sgd" (the first-order derivation's setting) or "adam" (one AdamW step from a
    fresh state, as the trainer's first update).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from dynamo_jax import modulation

    cfg = policy.config
    N = cfg.prompts_per_step
    key = jax.random.key(seed)
    n = np.full(N, cfg.rollouts_per_prompt)
    grad_fn = jax.jit(
        jax.grad(
            lambda params, b, adv, w: (
                -jnp.sum(
                    w
                    * adv
                    * jnp.sum(_token_stats(policy, params, b, False).logp * b["response_mask"], 1)
                )
            )
        )
    )
    stats_fn = jax.jit(lambda params, b: _token_stats(policy, params, b, True))
    per_lr: dict[float, dict[str, list]] = {lr: {} for lr in learning_rates}
    for bi in range(batches):
        records = pick_prompts(policy.task, N, seed * 1000 + bi)
        batch = sample_batch(policy, records, n, jax.random.fold_in(key, bi))
        adv = _row_advantages(batch, N, cfg).astype(np.float32)
        model_in = {
            k_: batch[k_]
            for k_ in ("input_ids", "positions", "attention_mask", "targets", "response_mask")
        }
        before = stats_fn(policy.params, model_in)
        mask = model_in["response_mask"]
        est = {}
        for expectation in ("sequence", "vocab"):
            est[expectation] = np.asarray(
                modulation.entropy_change(
                    adv,
                    before.logp,
                    before.logp,
                    before.entropy,
                    mask,
                    cfg.loss.eps_low,
                    cfg.loss.eps_high,
                    expectation,
                    before.expected_pi_lambda,
                )
            )
        w = _row_weights(batch, N, "token_mean")
        g = grad_fn(policy.params, model_in, adv, w)
        sel = (mask > 0) & (adv[:, None] != 0)
        h0 = np.asarray(before.entropy)
        for lr in learning_rates:
            tx = optax.sgd(lr) if optimizer == "sgd" else optax.adamw(lr, weight_decay=0.0)
            updates, _ = tx.update(g, tx.init(policy.params), policy.params)
            new_params = optax.apply_updates(policy.params, updates)
            h1 = np.asarray(stats_fn(new_params, model_in).entropy)
            measured = (h1 - h0)[sel]
            acc = per_lr[lr]
            acc.setdefault("measured", []).append(measured)
            for e, v in est.items():
                acc.setdefault(e, []).append(v[sel])
            acc.setdefault("neg_adv", []).append(np.broadcast_to(-adv[:, None], sel.shape)[sel])
            acc.setdefault("entropy", []).append(h0[sel])
        log(f"batch {bi}: {int(sel.sum())} tokens with A != 0")
    out: dict[str, Any] = {"optimizer": optimizer, "batches": batches, "by_lr": {}}
    for lr, acc in per_lr.items():
        cat = {k_: np.concatenate(v) for k_, v in acc.items()}
        m = cat["measured"]
        keep = np.random.default_rng(0).permutation(m.size)[:4000]
        out["by_lr"][lr] = {
            "tokens": int(m.size),
            "mean_abs_measured": float(np.mean(np.abs(m))) if m.size else float("nan"),
            "spearman_signed": {
                "sequence": spearman(cat["sequence"], m),
                "vocab": spearman(cat["vocab"], m),
                "-A (reference)": spearman(cat["neg_adv"], m),
            },
            "spearman_abs": {
                "sequence": spearman(np.abs(cat["sequence"]), np.abs(m)),
                "vocab": spearman(np.abs(cat["vocab"]), np.abs(m)),
                "H (reference)": spearman(cat["entropy"], np.abs(m)),
            },
            "per_batch_signed_vocab": [
                spearman(a, b) for a, b in zip(acc["vocab"], acc["measured"], strict=True)
            ],
            "per_batch_signed_sequence": [
                spearman(a, b) for a, b in zip(acc["sequence"], acc["measured"], strict=True)
            ],
            "samples": {k_: v[keep] for k_, v in cat.items()},
        }
    return out


def entropy_change_table(result: Mapping[str, Any]) -> str:
    lines = [
        "| optimizer, lr | tokens | mean abs dH measured | rho signed: sequence / vocab / -A "
        "| rho abs: sequence / vocab / H |",
        "|---|---|---|---|---|",
    ]
    for lr, r in result["by_lr"].items():
        s, a = r["spearman_signed"], r["spearman_abs"]
        lines.append(
            f"| {result['optimizer']}, {lr:g} | {r['tokens']} | {r['mean_abs_measured']:.3g} "
            f"| {s['sequence']:.3f} / {s['vocab']:.3f} / {s['-A (reference)']:.3f} "
            f"| {a['sequence']:.3f} / {a['vocab']:.3f} / {a['H (reference)']:.3f} |"
        )
    return "\n".join(lines)


def tabular_entropy_change(
    logits: np.ndarray, action: int, advantage: float, lr: float
) -> tuple[float, float]:
    """(first-order vocab estimate of the entropy change, the exact change) for one softmax
    state whose logits take one gradient step lr * A * d log pi(action) / d logits. The vocab
    estimate of SPEC 2.2 (times lr) is exact to first order in this tabular setting."""

    def entropy(z):
        q = np.exp(z - z.max())
        q /= q.sum()
        return float(-np.sum(q * np.log(q))), q

    h, pi = entropy(logits)
    lam = np.log(pi) + h
    est = -lr * advantage * (pi[action] * lam[action] - np.sum(pi * pi * lam))
    new = logits + lr * advantage * (np.eye(pi.size)[action] - pi)
    return float(est), entropy(new)[0] - h


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)
# --------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: Sequence[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    order = list(DEFAULT_VARIANTS) + [n for n in names if n not in DEFAULT_VARIANTS]
    return {n: cmap(order.index(n) % 10) for n in names}


def plot_band(ax, agg: Mapping[str, np.ndarray], label: str, color: Any, window: int = 1):
    x, m, s = agg["x"], smooth(agg["mean"], window), smooth(agg["std"], window)
    ax.plot(x, m, label=label, color=color, lw=1.5)
    if agg["n"].size and agg["n"][0] > 1:
        ax.fill_between(x, m - s, m + s, color=color, alpha=0.18, lw=0)


TRAIN_PANELS = (
    ("reward", "train reward"),
    ("eval_accuracy", "held-out accuracy (Pass@1)"),
    ("entropy", "entropy (nats/token)"),
    ("grad_norm", "grad norm"),
    ("clip_frac_low", "clip fraction low"),
    ("clip_frac_high", "clip fraction high"),
    ("zero_variance_frac", "rollouts in zero-variance groups"),
    ("alloc_max", "largest group size"),
)


def plot_training_curves(
    sweep: Mapping[str, Mapping[int, Any]],
    path: str | None = None,
    panels: Sequence[tuple[str, str]] = TRAIN_PANELS,
    window: int = 10,
    rollouts_per_step: int | None = None,
):
    """Grid of per-step metrics, mean over seeds +- one std (smoothed over `window` steps;
    held-out accuracy unsmoothed, with the value before RL at 0)."""
    plt = _plt()
    cols = 4
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    colors = _colors(list(sweep))
    for ax, (key, title) in zip(axes.ravel(), panels, strict=False):
        for v, per_seed in sweep.items():
            ev = key == "eval_accuracy"
            agg = aggregate(per_seed, key, rollouts_per_step, with_before=ev)
            if agg["x"].size:
                plot_band(ax, agg, VARIANT_LABELS.get(v, v), colors[v], 1 if ev else window)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rollouts" if rollouts_per_step else "step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(fig, path, dpi=56)


def plot_accuracy_vs_rollouts(
    sweep: Mapping[str, Mapping[int, Any]], rollouts_per_step: int, path: str | None = None
):
    """(iii): held-out accuracy against cumulative rollouts, mean over seeds, band = min..max."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = _colors(list(sweep))
    for v, per_seed in sweep.items():
        agg = aggregate(per_seed, "eval_accuracy", rollouts_per_step, with_before=True)
        if not agg["x"].size:
            continue
        n = int(agg["n"][0])
        ax.plot(
            agg["x"],
            agg["mean"],
            marker="o",
            ms=3,
            color=colors[v],
            label=f"{VARIANT_LABELS.get(v, v)} ({n} seed{'s' if n > 1 else ''})",
        )
        if n > 1:
            ax.fill_between(agg["x"], agg["min"], agg["max"], color=colors[v], alpha=0.15, lw=0)
    ax.set_xlabel("cumulative rollouts")
    ax.set_ylabel("held-out Pass@1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_zero_variance(
    sweep: Mapping[str, Mapping[int, Any]], path: str | None = None, window: int = 10
):
    """(ii): share of rollouts in zero-variance groups per step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    colors = _colors(list(sweep))
    for v, per_seed in sweep.items():
        agg = aggregate(per_seed, "zero_variance_frac")
        if agg["x"].size:
            plot_band(ax, agg, VARIANT_LABELS.get(v, v), colors[v], window)
    ax.set_xlabel("step")
    ax.set_ylabel("share of rollouts in\nzero-variance groups")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_allocation_histogram(
    hists: Mapping[int, np.ndarray], n_max: int, path: str | None = None, title: str = ""
):
    """Heat map: x = step, y = group size n, colour = prompts that got n rollouts. The x axis
    counts steps done (step index + 1), as `series` and every other plot do."""
    plt = _plt()
    steps, mat = allocation_matrix(hists, n_max)
    steps = steps + 1
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    if steps.size:
        im = ax.imshow(
            mat.T,
            aspect="auto",
            origin="lower",
            cmap="viridis",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, n_max + 0.5),
            interpolation="nearest",
        )
        fig.colorbar(im, ax=ax, label="prompts")
    ax.set_xlabel("step")
    ax.set_ylabel("rollouts per prompt")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_controlled(result: Mapping[str, Any], path: str | None = None):
    """Controlled experiment: allocations per prompt and variances (analytic vs empirical)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(result["allocations"])
    p = result["p_correct"]
    order = np.argsort(p)
    width = 0.8 / (len(names) + 1)
    xs = np.arange(p.size)
    for j, name in enumerate(names):
        a1.bar(xs + j * width, result["allocations"][name]["n"][order], width, label=name)
    a1.plot(xs + 0.4, result["continuous_n"][order], "k.", label="continuous optimum")
    a1.set_xticks(xs + 0.4, [f"{v:.2f}" for v in p[order]], rotation=60, fontsize=7)
    a1.set_xlabel("p(correct) of the prompt")
    a1.set_ylabel("rollouts n_i")
    a1.legend(fontsize=7)
    ana = [result["allocations"][n]["analytic"] for n in names]
    emp = [result["allocations"][n]["empirical"] for n in names]
    se = [2 * result["allocations"][n]["stderr"] for n in names]
    x2 = np.arange(len(names))
    a2.bar(x2 - 0.2, ana, 0.4, label="analytic")
    a2.bar(x2 + 0.2, emp, 0.4, yerr=se, label=f"empirical ({result['draws']} draws, 2 s.e.)")
    a2.axhline(result["continuous_optimum"], color="k", ls="--", lw=1, label="continuous optimum")
    a2.axhline(result["unbounded_optimum"], color="gray", ls=":", lw=1, label="unbounded optimum")
    a2.set_xticks(x2, names, rotation=20, fontsize=8)
    a2.set_ylabel("trace Var(g_hat)")
    a2.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_pg_covariance(result: Mapping[str, Any], path: str | None = None):
    """(i): trace of the policy-gradient covariance per allocation, both estimators."""
    plt = _plt()
    modes = result["modes"]
    names = list(modes)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, e in zip(axes, ESTIMATORS, strict=True):
        tr = [modes[n][e]["trace"] for n in names]
        se = [2 * modes[n][e]["stderr"] for n in names]
        ax.bar(names, tr, yerr=se, color=["C0", "C1", "C2", "C3", "C4"][: len(names)])
        ax.set_title(f"{e} estimator ({result['draws']} draws, 2 s.e.)", fontsize=10)
        ax.set_ylabel("trace Cov(grad)")
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_entropy_change(result: Mapping[str, Any], path: str | None = None):
    """(iv): measured entropy change against the estimates (one row per learning rate)."""
    plt = _plt()
    lrs = list(result["by_lr"])
    fig, axes = plt.subplots(len(lrs), 2, figsize=(9, 3.4 * len(lrs)), squeeze=False)
    for row, lr in zip(axes, lrs, strict=True):
        r = result["by_lr"][lr]
        m = r["samples"]["measured"]
        for ax, e in zip(row, ("sequence", "vocab"), strict=True):
            ax.scatter(r["samples"][e], m, s=3, alpha=0.3)
            rho = r["spearman_signed"][e]
            ax.set_title(
                f"{e} expectation, {result['optimizer']} lr {lr:g}: rho = {rho:.2f}", fontsize=9
            )
            ax.set_xlabel("estimated dH (SPEC 2.2)", fontsize=8)
            ax.set_ylabel("measured H_after - H_before", fontsize=8)
            ax.axhline(0, color="gray", lw=0.5)
            ax.axvline(0, color="gray", lw=0.5)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | None, dpi: int = 72):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=dpi)
        _plt().close(fig)
        return path
    return fig


def to_jsonable(x: Any) -> Any:
    """numpy -> lists/floats, recursively (for results.json)."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x
