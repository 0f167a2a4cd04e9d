"""Math rewards: answer extraction, equivalence, and a time-limited verifier pool.  [host]

Three layers, each usable alone:

- `extract_answer(text)`: the final answer of a response (last ``\\boxed{}``, then answer phrases,
  then optionally the last number). A linear scan; no backtracking regexes.
- `is_equivalent(pred, gold)` / `score_answer(pred, gold)`: a normalised-string fast path, then
  math-verify (parse + verify) for fractions, decimals, LaTeX, sets, intervals, expressions.
- `MathVerifier`: scores a batch in worker processes with a per-answer time limit. sympy can hang
  on inputs such as ``10^{10^{10^{10}}}`` inside C code where no signal reaches it, so a worker that
  overruns is killed, replaced, and its item scored incorrect with status ``timeout``.

math-verify's own time-outs (signal.alarm) are switched off everywhere: they raise outside the main
thread and they would cancel our own interval timer. Time is bounded by us instead (see
`MathVerifier`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import unicodedata
import weakref
from collections import deque
from collections.abc import Callable, Container, Sequence
from multiprocessing.connection import Connection, wait

import numpy as np

STATUSES = ("ok", "no_answer", "parse_error", "timeout")
"""Per-item outcome: ``ok`` means the answer was compared (it may still be wrong)."""

ScoreFn = Callable[[str, str], tuple[bool, str]]

# ------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped char, or a grouping brace
# Each alternative is one quantifier followed by a literal: no ambiguous backtracking.
_ANSWER_ANCHOR = re.compile(r"####|answer[ \t]+is|answer[ \t]*:", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3}(?!\d))*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _last_box(text: str) -> tuple[int, int] | None:
    """(start of the command, end of the command name) of the last box command, or None."""
    best: tuple[int, int] | None = None
    for cmd in _BOX_COMMANDS:
        i = text.rfind(cmd)
        # Skip longer command names such as \boxedx; each rfind scans a disjoint region.
        while i >= 0 and i + len(cmd) < len(text) and text[i + len(cmd)].isalpha():
            i = text.rfind(cmd, 0, i)
        if i >= 0 and (best is None or i > best[0]):
            best = (i, i + len(cmd))
    return best


def _braced_group(text: str, open_pos: int) -> str | None:
    """Content of the group opened by ``text[open_pos] == '{'``; None when it never closes."""
    depth = 0
    for m in _BRACE_TOKEN.finditer(text, open_pos):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : m.start()]
    return None


def _box_content(text: str, name_end: int) -> str | None:
    j = name_end
    n = len(text)
    while j < n and text[j] in " \t":
        j += 1
    if j < n and text[j] == "{":
        return _braced_group(text, j)
    # \boxed 5 (TeX takes the next token): up to whitespace or a math delimiter.
    k = j
    while k < n and not text[k].isspace() and text[k] != "$":
        k += 1
    return text[j:k].rstrip(".,;")


def _strip_math_delimiters(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            return s[len(left) : len(s) - len(right)].strip()
    return s


def _phrase_candidate(text: str, start: int) -> str:
    end = text.find("\n", start)
    line = text[start : end if end >= 0 else len(text)]
    line = line.strip().lstrip(":").strip().strip("*").strip()
    if line.startswith("$"):  # "The answer is $\frac{1}{2}$ since ..." -> the first math segment
        close = line.find("$", 1)
        if close > 0:
            return line[1:close].strip()
    if line.startswith("\\("):
        close = line.find("\\)")
        if close > 0:
            return line[2:close].strip()
    cut = line.find(". ")
    if cut >= 0:
        line = line[:cut]
    return _strip_math_delimiters(line.rstrip(".").strip().strip("*").strip())


def extract_answer(text: str, *, phrase_fallback: bool = True, last_number_fallback: bool = True):
    """The final answer in a response, or None.

    Order: the LAST ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed 5`` (nested braces matched,
    escaped ``\\{`` ignored; an unbalanced or empty last box gives None); else the last
    "The answer is X" / "Answer: X" / "#### X"; else (optionally) the last number. Linear time.
    """
    if not isinstance(text, str) or not text:
        return None
    box = _last_box(text)
    if box is not None:
        content = _box_content(text, box[1])
        if content is None or not content.strip():
            return None
        return content.strip()
    if phrase_fallback:
        anchors = [m.end() for m in _ANSWER_ANCHOR.finditer(text)]
        for start in reversed(anchors):
            cand = _phrase_candidate(text, start)
            if cand:
                return cand
    if last_number_fallback:
        last = None
        for last in _NUMBER.finditer(text):  # noqa: B007 - we want the final match
            pass
        if last is not None:
            return last.group()
    return None


# ------------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------------

_TEXT_CMD = r"\\(?:text|textbf|textrm|mathrm|mbox|operatorname)"
_WHOLE_TEXT = re.compile(rf"^{_TEXT_CMD}\{{([^{{}}]*)\}}$")
_TRAILING_TEXT = re.compile(rf"\s*{_TEXT_CMD}\{{([^{{}}]*)\}}(?:\^\{{?[23]\}}?)?\s*$")
# Unit words that are also single letters or an English word ("3m" may be 3 times m, "2 in"
# anything): stripped only after a space ("5 m") or inside a text command ("5\,\mathrm{m}").
_SHORT_UNITS = "m|g|in"
_UNIT_WORDS = (
    "cm|mm|km|meters?|metres?|centimeters?|kilometers?|inch(?:es)?|feet|foot|ft|yards?|"
    "miles?|units?|sq|square|cubic|degrees?|dollars?|cents?|hours?|hrs?|minutes?|mins?|"
    "seconds?|secs?|days?|weeks?|years?|kg|grams?|kilograms?|pounds?|lbs?|liters?|litres?|"
    "ml|mph|percent"
)
_TRAILING_UNIT = re.compile(
    rf"(?<=[\d}}])(?:(?:[ \t]*(?:{_UNIT_WORDS})|[ \t]+(?:{_SHORT_UNITS}))\b"
    rf"(?:\^\{{?[23]\}}?)?\.?[ \t]*)+$"
)
_UNIT_TEXT = re.compile(rf"^(?:\s*(?:{_UNIT_WORDS}|{_SHORT_UNITS})\b\.?)+\s*$")
# One upright letter is that letter: "\mathrm{i}", "\mathrm{e}" (math-verify drops a trailing
# \mathrm{...} as a unit, so "3+4\mathrm{i}" would read as 7).
_TEXT_LETTER = re.compile(rf"{_TEXT_CMD}\{{\s*([A-Za-z])\s*\}}")
# The text of a word answer ("\text{blue}", "\text{(A)}"): letters, no digit, no command.
_WORD_ANSWER = re.compile(r"^[^\d\\]*[A-Za-z][^\d\\]*$")
# Units are searched for only in the last characters: from every digit or "}" the pattern can run
# to the end before failing, so over a whole answer it is quadratic ("5 m^2 m^2 ... m^2 x": 97 s
# at 80k characters, and `normalize_answer` runs in the caller's process for majority votes).
_UNIT_WINDOW = 100
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])")
# "\\\\" (a row break) comes first so that its second backslash is never read as "\\ ".
_SPACING = re.compile(r"\\\\|\\[,!;: ]|\\q?quad(?![A-Za-z])|~|\\displaystyle(?![A-Za-z])")
_FRAC_VARIANTS = re.compile(r"\\[dt]frac(?![A-Za-z])")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SCIENTIFIC = re.compile(r"^(-?\d+(?:\.\d+)?)[eE]([+-]?\d+)$")
_CHOICE = re.compile(r"^\(([A-Ea-e])\)$")
# A space is dropped unless it separates two letters ("\pi r") or two numbers ("1 2" is not 12);
# a space before a group of exactly three digits is a thousands separator ("1\,000" = 1000).
_SOFT_SPACE = re.compile(
    r"(?<![A-Za-z0-9]) | (?![A-Za-z0-9])|(?<=[A-Za-z]) (?=\d)|(?<=\d) (?=[A-Za-z])"
    r"|(?<=\d) (?=\d{3}(?!\d))"
)


# Unicode math symbols that answers (gold ones especially) are written with, as LaTeX.
_UNICODE_SYMBOLS = {
    "\u2212": "-",  # minus sign
    "\u00d7": "\\times ",
    "\u00f7": "\\div ",
    "\u22c5": "\\cdot ",
    "\u00b7": "\\cdot ",
    "\u03c0": "\\pi ",
    "\u221e": "\\infty ",
    "\u2264": "\\le ",
    "\u2265": "\\ge ",
    "\u2260": "\\ne ",
}
_SUPERSCRIPTS = dict(
    zip("\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079", "0123456789", strict=True)
)
_SUPERSCRIPT_RUN = re.compile("[" + "".join(_SUPERSCRIPTS) + "]+")
_SQRT = re.compile(r"\u221a\s*(\d+(?:\.\d+)?|[A-Za-z]|\{)")


def _unicode_to_latex(s: str) -> str:
    """Full-width characters as ASCII, vulgar fractions (one half) as \\frac, superscript digits
    as ^{..}, the root sign as \\sqrt{..}, and the symbols above as their commands, so that an
    answer written in Unicode compares equal to the same answer in LaTeX."""
    if s.isascii():
        return s
    out = []
    for ch in s:
        if "\uff01" <= ch <= "\uff5e":  # full-width ASCII
            out.append(chr(ord(ch) - 0xFEE0))
        elif ch == "\u3000":
            out.append(" ")
        elif ch in _UNICODE_SYMBOLS:
            out.append(_UNICODE_SYMBOLS[ch])
        elif unicodedata.category(ch) == "No" and "\u2044" in unicodedata.normalize("NFKC", ch):
            num, _, den = unicodedata.normalize("NFKC", ch).partition("\u2044")
            out.append(f"\\frac{{{num}}}{{{den}}}")
        else:
            out.append(ch)
    s = "".join(out)
    s = _SUPERSCRIPT_RUN.sub(lambda m: "^{" + "".join(_SUPERSCRIPTS[c] for c in m.group()) + "}", s)
    return _SQRT.sub(lambda m: "\\sqrt{" if m.group(1) == "{" else f"\\sqrt{{{m.group(1)}}}", s)


def _strip_decorations(answer: str, *, keep_percent: bool) -> str:
    """Remove delimiters, units, degrees, currency and LaTeX spacing; keep whitespace."""
    s = " ".join(_unicode_to_latex(answer).split())  # single spaces for the regexes below
    s = _strip_math_delimiters(s)
    s = s.replace("\\$", "").replace("$", "")
    # LaTeX spacing first, so that "5\ \text{cm}" loses its unit rather than keep a "\".
    s = _SPACING.sub(lambda m: m.group() if m.group() == "\\\\" else " ", s)
    s = _TEXT_LETTER.sub(r"\1", s)
    m = _WHOLE_TEXT.match(s.strip())
    if m:
        s = m.group(1)
    for _ in range(3):  # "5\text{ cm}^2", "3 \text{ hours} \text{ total}"
        m = _TRAILING_TEXT.search(s)
        # A trailing text command goes when it holds units or a word, never one letter that
        # is not a unit: "\mathrm{i}" and "\mathrm{e}" are numbers.
        if m is None or not (_UNIT_TEXT.match(m.group(1)) or _is_word(m.group(1))):
            break
        stripped = s[: m.start()]
        if not stripped.strip():
            break
        s = stripped
    s = _DEGREES.sub("", s)
    if not keep_percent:
        s = s.replace("\\%", "").replace("%", "")
    s = _LEFT_RIGHT.sub("", s)
    s = _FRAC_VARIANTS.sub(r"\\frac", s)
    s = s.replace("{,}", ",")
    s = " ".join(s.split())
    m = _TRAILING_UNIT.search(s, max(0, len(s) - _UNIT_WINDOW))
    if m and s[: m.start()].strip():
        s = s[: m.start()]
    s = s.strip().rstrip(".").strip()
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    m = _SCIENTIFIC.match(s)
    if m:
        s = f"{m.group(1)}\\times10^{{{m.group(2)}}}"
    m = _CHOICE.match(s)
    if m:
        s = m.group(1)
    return s


def _is_word(text: str) -> bool:
    """Text of at least two letters and no digit or command: a word, not a symbol."""
    return sum(c.isalpha() for c in text) >= 2 and _WORD_ANSWER.match(text) is not None


def _word_answer(answer: str) -> str | None:
    """The text of an answer written as one text command holding words ("\\text{BAC}"), else
    None. Such answers are compared as strings: math-verify would read BAC as the product
    B*A*C and accept its anagrams."""
    s = _strip_math_delimiters(" ".join(answer.split())).replace("$", "")
    m = _WHOLE_TEXT.match(s.strip())
    return m.group(1) if m and _WORD_ANSWER.match(m.group(1)) else None


def normalize_answer(answer: str | None) -> str:
    """A canonical string for cheap equality and majority voting (not a full equivalence)."""
    if answer is None:
        return ""
    s = _strip_decorations(str(answer), keep_percent=False)
    return _SOFT_SPACE.sub("", s)


# ------------------------------------------------------------------------------------------------
# Equivalence
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify
    import math_verify.grader
    import math_verify.parser

    # We pass timeouts of None on purpose (see module docstring); silence the one-time warning.
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    extraction = (math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig())
    return math_verify, extraction


@functools.lru_cache(maxsize=8192)
def _parse(latex: str) -> tuple:
    mv, extraction = _math_verify()
    return tuple(mv.parse(f"${latex}$", extraction_config=extraction, parsing_timeout=None))


def _has_math(parsed: tuple) -> bool:
    return any(not isinstance(x, str) for x in parsed)


def score_answer(pred: str | None, gold: str) -> tuple[bool, str]:
    """(correct, status) for an extracted answer against a gold answer. Never raises Exception.

    Not time-limited by itself: run it through `MathVerifier` (or under your own limit).
    """
    if pred is None or not str(pred).strip():
        return False, "no_answer"
    try:
        pred, gold = str(pred), str(gold)
        norm_pred, norm_gold = normalize_answer(pred), normalize_answer(gold)
        if norm_pred and norm_pred == norm_gold:
            return True, "ok"
        if _word_answer(pred) is not None or _word_answer(gold) is not None:
            return norm_pred.casefold() == norm_gold.casefold(), "ok"  # "Monday" = "monday"
        # Percent is kept for math-verify: it knows 50\% == 0.5 == 50.
        gold_parsed = _parse(_strip_decorations(gold, keep_percent=True))
        pred_parsed = _parse(_strip_decorations(pred, keep_percent=True))
        if not pred_parsed or not gold_parsed:
            return False, "parse_error"
        if _has_math(gold_parsed) and not _has_math(pred_parsed):
            return False, "parse_error"  # only math-verify's raw-string fallback came back
        mv, _ = _math_verify()
        return bool(mv.verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None)), "ok"
    except Exception:  # malformed LaTeX, RecursionError, MemoryError, sympy internals
        return False, "parse_error"


def is_equivalent(pred: str | None, gold: str) -> bool:
    """True when the answer `pred` equals `gold` (normalised strings, then math-verify)."""
    return score_answer(pred, gold)[0]


def rewards(
    correct: np.ndarray, correct_reward: float = 1.0, incorrect_reward: float = -1.0
) -> np.ndarray:
    """Binary verifiable reward per row: [N] bool -> [N] float32."""
    return np.where(np.asarray(correct, bool), correct_reward, incorrect_reward).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Verifier
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    correct: np.ndarray  # [N] bool
    status: np.ndarray  # [N] str, one of STATUSES
    answers: list  # [N] extracted answer (str) or None
    num_verified: int  # unique (answer, gold) pairs actually compared
    worker_restarts: int  # workers killed (time-out) or crashed during this call
    elapsed_s: float

    @property
    def counts(self) -> dict[str, int]:
        return {s: int(np.sum(self.status == s)) for s in STATUSES}

    def metrics(self, prefix: str = "verify/") -> dict[str, float]:
        n = max(len(self.correct), 1)
        out = {f"{prefix}accuracy": float(np.sum(self.correct)) / n}
        out.update({f"{prefix}frac_{k}": v / n for k, v in self.counts.items()})
        out[f"{prefix}worker_restarts"] = float(self.worker_restarts)
        out[f"{prefix}elapsed_s"] = self.elapsed_s
        return out


def _warm_up() -> None:
    """Pay one-time costs (imports, regex and LaTeX parser construction) outside any time limit."""
    score_answer("\\frac{1}{2}", "0.5")


class _SoftTimeout(BaseException):
    """Raised by SIGALRM inside a worker. BaseException so math-verify's `except Exception`
    blocks cannot swallow it and carry on with the next extraction strategy."""


def _raise_soft_timeout(signum, frame):
    raise _SoftTimeout()


def _fn_spec(fn: ScoreFn | str | None) -> str:
    if fn is None:
        return f"{__name__}:score_answer"
    if isinstance(fn, str):
        return fn
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module in (None, "__main__") or "<" in qualname:
        raise ValueError(
            f"score_fn {fn!r} must be a module-level function importable by worker processes "
            "(or pass 'module:function')."
        )
    return f"{module}:{qualname}"


def _resolve_fn(spec: str) -> ScoreFn:
    """'package.module:function' or '/path/to/file.py:function' (tests inject hooks this way)."""
    module, _, qualname = spec.rpartition(":")
    if module.endswith(".py"):
        mod_spec = importlib.util.spec_from_file_location(f"_score_fn_{abs(hash(module))}", module)
        obj = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(obj)
    else:
        obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _call_limited(fn: ScoreFn, pred: str, gold: str, limit: float | None) -> tuple[bool, str]:
    """Run `fn` with a SIGALRM interval timer when possible (main thread only)."""
    use_timer = limit is not None and threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGALRM, _raise_soft_timeout) if use_timer else None
    try:
        try:
            if use_timer:
                signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                correct, status = fn(pred, gold)
            finally:
                if use_timer:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            return False, "timeout"
        except Exception:
            return False, "parse_error"
    finally:
        if use_timer:
            signal.signal(signal.SIGALRM, old)
    status = status if status in STATUSES else "parse_error"
    return bool(correct) and status == "ok", status


def _worker_main() -> None:
    """Entry point of a worker process: (task_id, pred, gold) in, (task_id, correct, status) out."""
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints go to stderr, never into the protocol channel
    inbox, outbox = Connection(0, writable=False), Connection(out_fd, readable=False)
    cfg = inbox.recv()
    if cfg.get("parent_death_signal"):
        try:  # Linux: die with the parent even while stuck in C code
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != cfg["parent_pid"]:
                return
        except Exception:
            pass
    if cfg.get("memory_limit_mb"):
        import resource

        # Headroom on top of what is mapped now (thread-pool arenas make the base vary by host):
        # a runaway bigint then raises MemoryError instead of taking the machine down.
        try:
            with open("/proc/self/statm") as f:
                mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            mapped = 0
        limit = mapped + (int(cfg["memory_limit_mb"]) << 20)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):
            pass
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    fn = _resolve_fn(cfg["score_fn"])
    _warm_up()
    soft_limit = cfg["time_limit"]
    outbox.send(("ready", os.getpid()))
    while True:
        try:
            msg = inbox.recv()
        except (EOFError, OSError):
            msg = None
        if msg is None:  # stateless: skip the slow interpreter teardown (sympy caches)
            sys.stderr.flush()
            os._exit(0)
        task_id, pred, gold = msg
        correct, status = _call_limited(fn, pred, gold, soft_limit)
        outbox.send((task_id, correct, status))


class _Worker:
    def __init__(self, cfg: dict, start_timeout: float):
        path = [os.getcwd() if p == "" else p for p in sys.path]
        boot = (
            "import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
            f"from {__name__} import _worker_main; _worker_main()"
        )
        # One thread per numeric library: workers are many and small.
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot, json.dumps(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            env=env,
        )
        self.to_child = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.from_child = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.to_child.send(cfg)
        self.ready = False
        self.task: int | None = None
        self.deadline = time.monotonic() + start_timeout  # start-up deadline until ready

    def kill(self) -> None:
        for conn in (self.to_child, self.from_child):
            try:
                conn.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _shutdown(workers: list[_Worker]) -> None:
    """Ask every worker to exit, give them a second in total, then kill the rest."""
    for w in workers:
        try:
            w.to_child.send(None)
        except OSError:
            pass
    deadline = time.monotonic() + 1.0
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        w.kill()
    workers.clear()


class MathVerifier:
    """Scores responses against gold answers in worker processes with a per-answer time limit.

    Per response: `extract_answer` runs here (linear time); identical (answer, gold) pairs are
    compared once; each comparison runs in a worker under a SIGALRM timer of `time_limit` seconds
    (status ``timeout`` when it fires). Code stuck in C ignores signals, so a worker that has not
    answered after ``time_limit + kill_grace`` is SIGKILLed, its item scored ``timeout`` and a
    fresh worker started in the background; a crashed worker scores its item ``parse_error``.
    A call therefore always returns, in at most about ceil(unique / workers) * (time_limit +
    kill_grace) seconds.

    Workers are plain ``python -c`` subprocesses (not multiprocessing): no re-import of the
    caller's ``__main__`` (a training script that imports JAX), no fork of a threaded JAX
    process. Each starts in ~0.5-1 s (import + warm-up); they start in __init__ without blocking
    and are reused across calls. Use as a context manager or call close().

    num_workers=0 scores in this process (tests, debugging): the soft timer still applies in
    the main thread, but nothing can interrupt code stuck in C.
    """

    def __init__(
        self,
        num_workers: int = min(4, os.cpu_count() or 1),
        time_limit: float = 5.0,
        *,
        kill_grace: float = 1.0,
        max_answer_chars: int = 1000,
        phrase_fallback: bool = True,
        last_number_fallback: bool = False,
        score_fn: ScoreFn | str | None = None,
        memory_limit_mb: int | None = 4096,
        start_timeout: float = 120.0,
    ):
        if num_workers < 0 or time_limit <= 0 or kill_grace < 0:
            raise ValueError("need num_workers >= 0, time_limit > 0, kill_grace >= 0")
        self.num_workers = num_workers
        self.time_limit = float(time_limit)
        self.kill_grace = float(kill_grace)
        self.max_answer_chars = max_answer_chars
        self.phrase_fallback = phrase_fallback
        self.last_number_fallback = last_number_fallback
        self.start_timeout = start_timeout
        self._spec = _fn_spec(score_fn)
        self._local_fn = score_fn if callable(score_fn) else None
        self._cfg = dict(
            score_fn=self._spec,
            time_limit=self.time_limit,
            memory_limit_mb=memory_limit_mb,
            parent_pid=os.getpid(),
            # PR_SET_PDEATHSIG fires when the creating *thread* exits: only safe from main.
            parent_death_signal=threading.current_thread() is threading.main_thread(),
        )
        self.total_restarts = 0
        # Task ids are unique over the verifier's life: a worker still busy with the task of an
        # interrupted call (KeyboardInterrupt, an exception in the caller) must not have its late
        # answer taken for the task with the same index in the next call.
        self._next_task_id = 0
        self._ever_ready = False
        self._start_failures = 0
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        self._workers.extend(self._new_worker() for _ in range(num_workers))
        if num_workers == 0:
            _warm_up()

    # -- lifecycle ---------------------------------------------------------------------------
    def _new_worker(self) -> _Worker:
        return _Worker(self._cfg, self.start_timeout)

    def wait_ready(self) -> float:
        """Block until every worker is started; returns the seconds waited."""
        t0 = time.monotonic()
        while not all(w.ready for w in self._workers):
            self._poll(set())
        return time.monotonic() - t0

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scoring -------------------------------------------------------------------------------
    def extract(self, response: str) -> str | None:
        return extract_answer(
            response,
            phrase_fallback=self.phrase_fallback,
            last_number_fallback=self.last_number_fallback,
        )

    def __call__(self, responses: Sequence[str], answers: Sequence[str]) -> VerifyResult:
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        t0 = time.monotonic()
        restarts0 = self.total_restarts
        n = len(responses)
        extracted = [self.extract(r) if isinstance(r, str) else None for r in responses]
        correct = np.zeros(n, bool)
        status = np.full(n, "no_answer", dtype=object)
        task_of: dict[tuple[str, str], int] = {}
        rows_of_task: list[list[int]] = []
        for i, pred in enumerate(extracted):
            if pred is None:
                continue
            if len(pred) > self.max_answer_chars:
                status[i] = "parse_error"
                continue
            key = (pred, str(answers[i]))
            if key not in task_of:
                task_of[key] = len(rows_of_task)
                rows_of_task.append([])
            rows_of_task[task_of[key]].append(i)
        tasks = list(task_of)
        results = self._run(tasks)
        for t, rows in enumerate(rows_of_task):
            ok, st = results[t]
            correct[rows] = ok
            status[rows] = st
        return VerifyResult(
            correct=correct,
            status=status.astype(str),
            answers=extracted,
            num_verified=len(tasks),
            worker_restarts=self.total_restarts - restarts0,
            elapsed_s=time.monotonic() - t0,
        )

    def _run(self, tasks: list[tuple[str, str]]) -> list[tuple[bool, str]]:
        if self.num_workers == 0:
            fn = self._local_fn or _resolve_fn(self._spec)
            return [_call_limited(fn, p, g, self.time_limit) for p, g in tasks]
        if not self._workers:
            raise RuntimeError("MathVerifier is closed")
        results: list[tuple[bool, str] | None] = [None] * len(tasks)
        base = self._next_task_id
        self._next_task_id += len(tasks)
        live = range(base, base + len(tasks))
        pending = deque(range(len(tasks)))
        remaining = len(tasks)
        while remaining:
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    i = pending.popleft()
                    try:
                        w.to_child.send((base + i, *tasks[i]))
                    except OSError:  # died while idle: replace it and retry the task elsewhere
                        pending.appendleft(i)
                        self._replace(w)
                        continue
                    w.task = base + i
                    w.deadline = time.monotonic() + self.time_limit + self.kill_grace
            for tid, res in self._poll(live):
                if results[tid - base] is None:
                    results[tid - base] = res
                    remaining -= 1
        return results  # type: ignore[return-value]

    def _poll(self, live_tasks: Container[int]) -> list[tuple[int, tuple[bool, str]]]:
        """Wait for one round of worker events; returns finished (task_id, result) pairs."""
        done: list[tuple[int, tuple[bool, str]]] = []
        waiting = [w for w in self._workers if not w.ready or w.task is not None]
        if not waiting:
            return done
        timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
        readable = wait([w.from_child for w in waiting], timeout=timeout)
        for w in waiting:
            if w.from_child in readable:
                try:
                    msg = w.from_child.recv()
                except (EOFError, OSError):
                    if not w.ready:
                        self._fail_start(w, "exited during start-up")
                        continue
                    if w.task is not None:
                        done.append((w.task, (False, "parse_error")))  # crashed on this input
                    self._replace(w)
                    continue
                if msg[0] == "ready":
                    w.ready = True
                    self._ever_ready = True
                    self._start_failures = 0
                elif msg[0] == w.task:
                    done.append((w.task, (bool(msg[1]), str(msg[2]))))
                    w.task = None
            elif time.monotonic() >= w.deadline:
                if not w.ready:
                    self._fail_start(w, f"did not start within {self.start_timeout:.0f} s")
                    continue
                done.append((w.task, (False, "timeout")))
                self._replace(w)
        return [(t, r) for t, r in done if t in live_tasks]

    def _fail_start(self, w: _Worker, why: str) -> None:
        # A replacement in a pool that has worked before gets a few more tries (a transient
        # fork/memory failure must not stop training); a pool that never started raises at once.
        self._start_failures += 1
        if self._ever_ready and self._start_failures <= 3:
            self._replace(w)
            return
        w.kill()
        self.close()
        raise RuntimeError(
            f"math verifier worker {why} (exit code {w.proc.returncode}); its stderr above "
            f"says why (score_fn={self._spec!r}, python={sys.executable})"
        )

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.total_restarts += 1
        self._workers[self._workers.index(w)] = self._new_worker()
