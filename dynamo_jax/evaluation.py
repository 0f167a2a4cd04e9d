"""Benchmark metrics: unbiased pass@k, maj@k, and results tables.  [host]

(The generation loop over benchmarks lives here too once sampling exists.)

pass@k follows Chen et al. (2021): with n samples of which c are correct,
``pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)``; the product form avoids
huge binomials. pass@1 reduces to c/n, the mean over samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dynamo_jax.rewards.math import normalize_answer


def pass_at_k(n, c, k: int):
    """Unbiased pass@k per problem; `n`, `c` broadcast (scalars give a float).

    Raises ValueError unless 1 <= k <= n and 0 <= c <= n for every problem.
    """
    n_arr = np.asarray(n)
    c_arr = np.asarray(c)
    if not (np.issubdtype(n_arr.dtype, np.integer) and np.issubdtype(c_arr.dtype, np.integer)):
        raise ValueError("n and c must be integers")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    n_arr, c_arr = np.broadcast_arrays(n_arr.astype(np.int64), c_arr.astype(np.int64))
    if np.any(c_arr < 0) or np.any(c_arr > n_arr):
        raise ValueError("need 0 <= c <= n")
    if np.any(k > n_arr):
        raise ValueError(f"k={k} exceeds the number of samples n={int(n_arr.min())}")
    # Factors i = n-c+1 .. n, padded with 1.0 where j >= c.   # [..., max_c]
    max_c = int(c_arr.max()) if c_arr.size else 0
    j = np.arange(max(max_c, 1))
    i = (n_arr - c_arr + 1)[..., None] + j
    factors = np.where(j < c_arr[..., None], 1.0 - k / i, 1.0)
    estimate = 1.0 - np.prod(factors, axis=-1)
    out = np.where(n_arr - c_arr < k, 1.0, estimate)
    return float(out) if out.ndim == 0 else out


def mean_pass_at_k(num_samples, num_correct, k: int) -> float:
    """pass@k averaged over problems."""
    return float(np.mean(pass_at_k(np.asarray(num_samples), np.asarray(num_correct), k)))


def majority_answer(answers: Sequence[str | None]) -> int | None:
    """Index of the representative sample of the most common normalised answer, or None.

    Missing/empty answers do not vote. Ties go to the answer whose first occurrence is earliest,
    and the representative is that first occurrence (deterministic, order-based).
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for idx, ans in enumerate(answers):
        key = normalize_answer(ans) if ans is not None else ""
        if not key:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, idx)
    if not counts:
        return None
    best = max(counts, key=lambda key: (counts[key], -first[key]))
    return first[best]


def maj_at_k(
    answers_per_problem: Sequence[Sequence[str | None]],
    correct_per_problem: Sequence[Sequence[bool]],
    k: int | None = None,
) -> np.ndarray:
    """Majority-vote correctness per problem over the first `k` samples (all when None).

    A problem counts as solved when the winning answer's representative sample is correct.
    Returns [num_problems] bool.
    """
    if len(answers_per_problem) != len(correct_per_problem):
        raise ValueError("answers and correct flags disagree on the number of problems")
    out = np.zeros(len(answers_per_problem), bool)
    for p, (answers, correct) in enumerate(
        zip(answers_per_problem, correct_per_problem, strict=True)
    ):
        if len(answers) != len(correct):
            raise ValueError(f"problem {p}: {len(answers)} answers, {len(correct)} flags")
        if k is not None and (k < 1 or k > len(answers)):
            raise ValueError(f"problem {p}: k={k} but {len(answers)} samples")
        m = len(answers) if k is None else k
        winner = majority_answer(list(answers[:m]))
        out[p] = winner is not None and bool(correct[winner])
    return out


def pass_at_1(correct_per_problem: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the fraction of correct samples (= mean pass@k at k=1)."""
    return float(np.mean([np.mean(np.asarray(c, float)) for c in correct_per_problem]))


def _is_count(name: str) -> bool:
    return name.startswith("num_") or name in ("n", "k")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def results_table(
    per_benchmark: Mapping[str, Mapping[str, Any]], *, percent: bool = True, digits: int = 1
) -> tuple[str, dict[str, Any]]:
    """A markdown table (one row per benchmark plus an average row) and a JSON-able dict.

    `per_benchmark`: {benchmark: {metric: value}}. Columns follow first appearance. The average
    row is the unweighted mean over benchmarks that report the metric; ``num_*`` counts are
    summed instead. Rates are shown as percentages when `percent`.
    """
    columns: list[str] = []
    for metrics in per_benchmark.values():
        columns.extend(m for m in metrics if m not in columns)
    average: dict[str, Any] = {}
    for col in columns:
        values = [float(m[col]) for m in per_benchmark.values() if m.get(col) is not None]
        if values:
            average[col] = int(sum(values)) if _is_count(col) else float(np.mean(values))

    def fmt(col: str, value: Any) -> str:
        if value is None:
            return "-"
        if _is_count(col):
            return str(int(value))
        value = float(value)
        return f"{100 * value:.{digits}f}" if percent else f"{value:.{digits + 2}f}"

    header = "| benchmark | " + " | ".join(columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    lines = [header, rule]
    for name, metrics in per_benchmark.items():
        cells = [fmt(c, metrics.get(c)) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if per_benchmark:
        cells = [fmt(c, average.get(c)) for c in columns]
        lines.append("| **average** | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    data = {
        "columns": columns,
        "benchmarks": {
            name: {c: _jsonable(v) for c, v in metrics.items()}
            for name, metrics in per_benchmark.items()
        },
        "average": average,
    }
    return table, data
