"""Benchmark metrics (unbiased pass@k, maj@k, results tables) and the benchmark loop.  [host]

``evaluate_benchmarks`` samples k responses per problem with a ``sampling.Sampler``, verifies them
and reports Pass@1 (mean over samples), pass@k and maj@k per benchmark plus the average, as
Markdown and JSON (``experiments/eval.py``; the trainer during training).

pass@k follows Chen et al. (2021): with n samples of which c are correct,
``pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)``; the product form avoids
huge binomials. pass@1 reduces to c/n, the mean over samples.
"""

from __future__ import annotations

import fractions
import json
import os
import re
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dynamo_jax.rewards.math import normalize_answer

_FINISH_LENGTH = 1  # sampling.FINISH_LENGTH (not imported: this module stays jax-free)


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
    """pass@k averaged over problems (ValueError when there are none: no NaN)."""
    if np.size(num_samples) == 0 or np.size(num_correct) == 0:
        raise ValueError("pass@k of no problems")
    return float(np.mean(pass_at_k(np.asarray(num_samples), np.asarray(num_correct), k)))


_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_RATIONAL_FORMS = (
    re.compile(rf"^(?P<num>{_NUMBER})$"),
    re.compile(rf"^(?P<num>{_NUMBER})/(?P<den>{_NUMBER})$"),
    re.compile(rf"^(?P<sign>[+-]?)\\[dt]?frac\{{(?P<num>{_NUMBER})\}}\{{(?P<den>{_NUMBER})\}}$"),
    re.compile(r"^(?P<sign>[+-]?)\\[dt]?frac(?P<num>\d)(?P<den>\d)$"),
)


def vote_key(answer: str | None) -> str:
    """The key under which an answer votes in a majority: its normalised text, except that a
    number written as an integer, a decimal or a plain fraction (``1/2``, ``\\frac{1}{2}``,
    ``\\frac12``, ``0.5``, ``0.50``) votes as its exact value, so equal numbers in different
    forms pool their votes. Other answers (``2\\sqrt{3}`` vs ``\\sqrt{12}``) vote by text.
    "" for a missing answer (no vote)."""
    text = normalize_answer(answer) if answer is not None else ""
    for form in _RATIONAL_FORMS:
        m = form.match(text)
        if m is None:
            continue
        groups = m.groupdict()
        value = fractions.Fraction(groups["num"])
        if groups.get("den") is not None:
            den = fractions.Fraction(groups["den"])
            if den == 0:
                return text
            value /= den
        if groups.get("sign") == "-":
            value = -value
        return f"={value}"
    return text


def majority_answer(answers: Sequence[str | None]) -> int | None:
    """Index of the representative sample of the most common answer (by `vote_key`), or None.

    Missing/empty answers do not vote. Ties go to the answer whose first occurrence is earliest,
    and the representative is that first occurrence (deterministic, order-based).
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for idx, ans in enumerate(answers):
        key = vote_key(ans)
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
        if not len(answers):
            raise ValueError(f"problem {p} has no samples")
        m = len(answers) if k is None else k
        winner = majority_answer(list(answers[:m]))
        out[p] = winner is not None and bool(correct[winner])
    return out


def pass_at_1(correct_per_problem: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the fraction of correct samples (= mean pass@k at k=1).

    ValueError when there are no problems or a problem has no samples (never NaN).
    """
    if len(correct_per_problem) == 0:
        raise ValueError("pass@1 of no problems")
    fractions = []
    for p, c in enumerate(correct_per_problem):
        c = np.asarray(c, float)
        if c.size == 0:
            raise ValueError(f"problem {p} has no samples")
        fractions.append(np.mean(c))
    return float(np.mean(fractions))


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


# ------------------------------------------------------------------------------------------------
# The benchmark evaluation loop
# ------------------------------------------------------------------------------------------------
def _pass_ks(k: int, pass_k: int | Sequence[int] | None) -> list[int]:
    """The k's of the pass@k / maj@k columns: 1 first, then the requested ones (<= k)."""
    if pass_k is None:
        wanted = [k]
    elif isinstance(pass_k, int):
        wanted = [pass_k]
    else:
        wanted = list(pass_k)
    for kk in wanted:
        if isinstance(kk, bool) or int(kk) != kk or kk < 1:
            raise ValueError(f"pass_k entries must be positive integers, got {kk!r}")
        if kk > k:
            raise ValueError(
                f"pass@{kk} needs at least {kk} samples per problem, but k = {k}: raise "
                f"eval.samples_per_prompt or lower eval.pass_k"
            )
    return sorted({1, *(int(kk) for kk in wanted)})


def _as_correct_and_answers(result: Any, texts: Sequence[str], extract: Callable):
    """A verifier's output -> ([N] bool, [N] extracted answers)."""
    if isinstance(result, tuple) and len(result) >= 2:  # MathVerify.details
        correct, answers = np.asarray(result[0], bool), list(result[1])
    elif hasattr(result, "correct"):  # rewards.math.VerifyResult
        answers = getattr(result, "answers", None)
        if answers is None:
            answers = [extract(t) for t in texts]
        correct, answers = np.asarray(result.correct, bool), list(answers)
    else:
        correct, answers = np.asarray(result, bool), [extract(t) for t in texts]
    if correct.shape != (len(texts),) or len(answers) != len(texts):
        raise ValueError(
            f"verify returned {correct.size} flags and {len(answers)} answers for "
            f"{len(texts)} responses"
        )
    return correct, answers


def evaluate_benchmarks(
    sampler: Any,
    params: Any,
    tokenizer: Any,
    benchmarks: Mapping[str, Sequence[Mapping[str, str]]],
    k: int,
    temperature: float,
    verify: Callable[[list[str], list[str]], Any],
    key: Any,
    *,
    encode_prompt: Callable[[str], list[int]] | None = None,
    pass_k: int | Sequence[int] | None = None,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    max_problems: int | None = None,
    max_rows_per_call: int = 1024,
    out_dir: str | os.PathLike | None = None,
    file_stem: str = "eval_results",
    extract: Callable[[str], str | None] | None = None,
    settings: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[str, dict[str, Any]]:
    """k samples per problem on every benchmark -> (markdown table, JSON-able dict).

    Args:
      sampler: a ``sampling.Sampler`` (anything with its ``generate``).
      params: the policy's parameters (``nnx.state(model, nnx.Param)``) or the model.
      tokenizer: decodes response tokens (``decode(ids)``).
      benchmarks: {name: records with "prompt" (the raw problem), "answer" and "id"}.
      k: samples per problem (the group size of each ``generate`` call).
      temperature, top_p, top_k, greedy: sampling knobs.
      verify: ``(responses, gold answers) -> [N] bool``; may instead return a
        ``rewards.math.VerifyResult`` or ``(correct, extracted answers, ...)`` (e.g.
        ``math_task.MathVerify.details``), whose extracted answers then feed maj@k.
      key: PRNG key. Row randomness is keyed by (benchmark name, problem index, sample index),
        so the samples do not depend on ``max_rows_per_call`` or on the other benchmarks.
      encode_prompt: problem text -> prompt token ids; default: the Qwen2.5-Math chat prompt
        (``math_task.math_prompt_encoder(tokenizer)``).
      pass_k: the k's of the pass@k and maj@k columns (default: k); pass@1 always comes first.
      max_problems: evaluate only the first problems of each benchmark (None: all).
      max_rows_per_call: rows per ``generate`` call (problems per call = this // k).
      out_dir: write ``{file_stem}.md`` and ``{file_stem}.json`` there.
      extract: answer extraction for maj@k when ``verify`` returns only booleans (default:
        ``rewards.math.extract_answer`` as MathVerifier does it: boxed, then answer phrases).
      settings: extra run facts recorded in the JSON (checkpoint step, model path, ...).

    Metrics per benchmark (and their unweighted average over benchmarks, ``results_table``):
      pass@1 = mean over problems of (correct samples / k), i.e. the mean over samples;
      pass@j = the unbiased estimator over the k samples (Chen et al. 2021);
      maj@j  = majority vote over the first j samples' extracted answers (``maj_at_k``).
    The JSON also holds per-problem correct counts, response lengths and truncation rates.
    """
    import jax

    from dynamo_jax.rewards.math import extract_answer

    if k < 1:
        raise ValueError(f"k must be >= 1 samples per problem, got {k}")
    if not benchmarks:
        raise ValueError("no benchmarks to evaluate (eval.benchmarks is empty)")
    ks = _pass_ks(k, pass_k)
    if extract is None:

        def extract(text: str) -> str | None:
            return extract_answer(text, last_number_fallback=False)

    if encode_prompt is None:
        from dynamo_jax.math_task import math_prompt_encoder

        encode_prompt = math_prompt_encoder(tokenizer)
    log = log or (lambda msg: None)
    if isinstance(key, int):
        key = jax.random.key(key)
    per_call = max(1, int(max_rows_per_call) // k)

    per_benchmark: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {}
    for name, all_records in benchmarks.items():
        t0 = time.perf_counter()
        records = list(all_records)[:max_problems] if max_problems else list(all_records)
        if not records:
            raise ValueError(f"benchmark {name!r} has no problems")
        prompts = [encode_prompt(r["prompt"]) for r in records]
        bench_key = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        texts: list[str] = []
        problem_of: list[int] = []
        sample_of: list[int] = []
        lengths: list[int] = []
        truncated: list[bool] = []
        for start in range(0, len(records), per_call):
            stop = min(start + per_call, len(records))
            out = sampler.generate(
                params,
                prompts[start:stop],
                np.arange(start, stop),
                np.full(stop - start, k, np.int64),
                bench_key,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                greedy=greedy,
            )
            for r in np.flatnonzero(out.valid):
                g = int(out.group_id[r])  # the prompt's position in this call
                n_tok = int(out.response_lengths[r])
                texts.append(tokenizer.decode(out.response_tokens[r, :n_tok].tolist()))
                problem_of.append(start + g if 0 <= g < stop - start else -1)
                sample_of.append(int(out.sample_index[r]))
                lengths.append(n_tok)
                truncated.append(int(out.finish_reason[r]) == _FINISH_LENGTH)
        # Every (problem, sample) exactly once: out-of-range indices would wrap (s = -1) or pick
        # another problem's gold answer, a repeated row would silently replace a sample.
        seen = np.zeros((len(records), k), bool)
        for p, s in zip(problem_of, sample_of, strict=True):
            if not (0 <= p < len(records) and 0 <= s < k) or seen[p, s]:
                raise RuntimeError(
                    f"benchmark {name!r}: the sampler returned an unexpected or repeated row "
                    f"(problem {p}, sample {s}) for {len(records)} problems x {k} samples"
                )
            seen[p, s] = True
        if not seen.all():
            raise RuntimeError(
                f"benchmark {name!r}: the sampler returned {seen.sum()} of "
                f"{seen.size} (problem, sample) rows"
            )
        golds = [str(records[p]["answer"]) for p in problem_of]
        correct, answers = _as_correct_and_answers(verify(texts, golds), texts, extract)

        # [problems, k] in sample order
        grid_correct = np.zeros((len(records), k), bool)
        grid_answers: list[list[str | None]] = [[None] * k for _ in records]
        for i, (p, s) in enumerate(zip(problem_of, sample_of, strict=True)):
            grid_correct[p, s] = correct[i]
            grid_answers[p][s] = answers[i]
        num_correct = grid_correct.sum(axis=1)
        metrics: dict[str, Any] = {"num_problems": len(records), "pass@1": pass_at_1(grid_correct)}
        for kk in ks[1:]:
            metrics[f"pass@{kk}"] = mean_pass_at_k(np.full(len(records), k), num_correct, kk)
        maj = {kk: maj_at_k(grid_answers, grid_correct, kk) for kk in ks[1:]}
        for kk in ks[1:]:
            metrics[f"maj@{kk}"] = float(np.mean(maj[kk]))
        per_benchmark[name] = metrics
        details[name] = {
            "num_samples": int(seen.size),
            "mean_response_tokens": float(np.mean(lengths)),
            "truncation_rate": float(np.mean(truncated)),
            "seconds": time.perf_counter() - t0,
            "per_problem": [
                {
                    "id": str(r.get("id", i)),
                    "num_correct": int(num_correct[i]),
                    **{f"maj@{kk}": bool(maj[kk][i]) for kk in ks[1:]},
                }
                for i, r in enumerate(records)
            ],
        }
        log(
            f"{name}: pass@1 {metrics['pass@1']:.3f} over {len(records)} problems x {k} "
            f"samples ({details[name]['seconds']:.1f} s)"
        )

    table, data = results_table(per_benchmark)
    data["settings"] = {
        "samples_per_problem": int(k),
        "pass_k": ks,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": int(top_k),
        "greedy": bool(greedy),
        "max_problems": max_problems,
        **dict(settings or {}),
    }
    data["details"] = details
    facts = ", ".join(f"{k_}={v}" for k_, v in data["settings"].items() if v is not None)
    markdown = (
        "# Benchmark results\n\n"
        f"{facts}. Pass@1 is the mean accuracy over the samples of each problem; pass@k is the "
        "unbiased estimator; maj@k is the majority vote over the first k samples. Percent; the "
        "average row is the unweighted mean over benchmarks.\n\n" + table
    )
    if out_dir is not None:
        write_results(out_dir, markdown, data, file_stem)
    return markdown, data


def write_results(
    out_dir: str | os.PathLike, markdown: str, data: Mapping[str, Any], file_stem: str
) -> tuple[str, str]:
    """Writes ``{file_stem}.md`` and ``{file_stem}.json`` (atomically); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, f"{file_stem}.md")
    json_path = os.path.join(out_dir, f"{file_stem}.json")
    for path, text in ((md_path, markdown), (json_path, json.dumps(data, indent=2) + "\n")):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return md_path, json_path


def flat_metrics(data: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``evaluate_benchmarks``' JSON -> scalars for a metrics writer:
    ``{"eval/AIME24/pass@1": ..., "eval/average/pass@1": ..., "eval_accuracy": avg pass@1}``
    (counts are left out)."""
    out: dict[str, float] = {}
    rows = {**data["benchmarks"], "average": data["average"]}
    for name, metrics in rows.items():
        for col, value in metrics.items():
            if not _is_count(col) and value is not None:
                out[f"{prefix}/{name}/{col}"] = float(value)
    if "pass@1" in data["average"]:
        out[f"{prefix}_accuracy"] = float(data["average"]["pass@1"])
    return out
