"""Metric writers: console progress bar, JSONL and TensorBoard, all in the work dir.

    writer = MetricsWriter(workdir, total_steps, start_step)
    writer.write(step, {"reward": 0.3, ...}, histograms={"allocation": n})
    writer.close()

On resume, JSONL lines for steps after the restored checkpoint (written by the run that was
killed) are dropped first, so the file holds each step exactly once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

PROGRESS_KEYS = ("reward", "accuracy", "entropy", "loss", "eval_accuracy")


def _clean(value: Any) -> float | int | None:
    v = np.asarray(value).item() if not isinstance(value, int | float) else value
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf; a None in the log is visible and honest
    return v


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics log. A last line that does not parse is a write cut short (a
    kill, a full disk) and is left out; a bad line before the last is an error naming it."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    out = []
    for i, (n, line) in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{os.fspath(path)}:line {n}: not a JSON record ({e.msg})") from None
    return out


class MetricsWriter:
    def __init__(
        self,
        workdir: str | os.PathLike,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.path = os.path.join(os.fspath(workdir), "metrics.jsonl")
        self._tb = None
        self._bar = None
        self._syncs = 0
        if not enabled:
            return
        os.makedirs(os.fspath(workdir), exist_ok=True)
        kept = [r for r in read_jsonl(self.path) if r.get("step", -1) < start_step]
        # Rewritten beside and renamed over: a kill during the rewrite leaves the old log whole.
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                os.path.join(os.fspath(workdir), "tensorboard"), purge_step=start_step
            )
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="RL", unit="step", dynamic_ncols=True
            )

    def write(
        self,
        step: int,
        scalars: Mapping[str, Any],
        histograms: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in scalars.items()}}
        # Histogram inputs (e.g. the allocation) go to the JSONL exactly, as lists; TensorBoard
        # only keeps bucket counts.
        exact = {k: np.asarray(v).tolist() for k, v in (histograms or {}).items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({**record, **exact}) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self._tb.add_scalar(key, value, step)
            for key, values in (histograms or {}).items():
                self._tb.add_histogram(key, np.asarray(values), step)
            self._tb.flush()
        if self._bar is not None:
            self._bar.update(step + 1 - self._bar.n)  # log_every > 1 writes every few steps
            shown = {k: f"{record[k]:.3g}" for k in PROGRESS_KEYS if record.get(k) is not None}
            self._bar.set_postfix(shown, refresh=False)

    def sync(self) -> None:
        """Put every logged event on disk now (call before a checkpoint). tensorboardX queues
        events for a writer thread that flushes every 2 minutes, and `flush()` does not wait
        for that queue: a run killed after its checkpoint would lose those steps for good (the
        resume purges only the steps after the checkpoint). Closing drains the queue; the
        reopened writer appends to a new event file of the same run."""
        if self._tb is not None:
            from tensorboardX import SummaryWriter

            logdir = self._tb.logdir
            self._tb.close()
            # A suffix of its own: a file name from the same second would truncate the last one.
            self._syncs += 1
            self._tb = SummaryWriter(logdir, filename_suffix=f".{os.getpid()}.{self._syncs}")

    def log_text(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        elif self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
