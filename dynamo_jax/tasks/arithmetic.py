"""A synthetic arithmetic task whose prompts differ in difficulty, with an exact verifier.

Problems are `a op b =` for op in {+, -, *} on 1-2 digit operands (`DEFAULT_MIX`). Difficulty
comes from the operation and the operand sizes, so a small model solves some prompts always, some
never and many sometimes: exactly the spread DynaMO's allocation is built for.

Answers are written least-significant digit first (`12+79=` -> `19`, i.e. 91 reversed): a carry
then only depends on digits already written, which a tiny causal model learns in minutes on a
CPU (with most-significant-first answers it needs far longer to get off the ground).

    splits = make_splits(seed=0, num_train=2000, num_heldout=200, num_warm_start=6000)
    record = splits.train[0]     # {"id": "arith-train-00000", "prompt": "12+7=", "answer": "91"}
    verify(["91", " 91 ", "20"], ["91", "91", "91"]) -> [True, True, False]
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np

# (operator, max digits of a, max digits of b, share of the problem set)
DEFAULT_MIX: tuple[tuple[str, int, int, float], ...] = (
    ("+", 1, 1, 0.15),
    ("-", 1, 1, 0.1),
    ("*", 1, 1, 0.15),
    ("+", 2, 1, 0.2),
    ("-", 2, 1, 0.1),
    ("+", 2, 2, 0.2),
    ("*", 2, 1, 0.1),
)


def _operand(rng: np.random.Generator, digits: int) -> int:
    return int(rng.integers(0, 10**digits))


def make_problems(
    num: int,
    seed: int,
    split: str,
    mix: tuple[tuple[str, int, int, float], ...] = DEFAULT_MIX,
    exclude: set[str] | None = None,
) -> list[dict[str, str]]:
    """`num` distinct problems with stable ids `arith-{split}-{i:05d}`.

    `exclude` holds prompt texts that must not appear (keeps held-out problems out of training).
    """
    shares = np.array([m[3] for m in mix], dtype=np.float64)
    shares = shares / shares.sum()
    # zlib.crc32, not hash(): str hashes are salted per process, which would change the problem
    # set between a run and its resume.
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    seen: set[str] = set(exclude or ())
    out: list[dict[str, str]] = []
    attempts = 0
    while len(out) < num:
        attempts += 1
        if attempts > 100 * num + 1000:
            raise ValueError(
                f"could only make {len(out)} distinct problems of {num} requested: the mix is "
                "too small; allow more digits or ask for fewer problems"
            )
        op, da, db, _ = mix[int(rng.choice(len(mix), p=shares))]
        a, b = _operand(rng, da), _operand(rng, db)
        if op == "-" and b > a:
            a, b = b, a  # non-negative answers
        prompt = f"{a}{op}{b}="
        if prompt in seen:
            continue
        seen.add(prompt)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(
            {"id": f"arith-{split}-{len(out):05d}", "prompt": prompt, "answer": str(value)[::-1]}
        )
    return out


class Splits(NamedTuple):
    """The task's disjoint problem sets (`make_splits`)."""

    train: list[dict[str, str]]  # the RL prompts
    heldout: list[dict[str, str]]  # the reported held-out accuracy
    warm_start: list[dict[str, str]]  # the supervised warm start's training pool
    validation: list[dict[str, str]]  # what stops the warm start early (not the held-out set)


def difficulty_class(prompt: str) -> str:
    """`"+2x1"`: the operator and the digit counts of the two operands of `a op b =`."""
    for op in "+-*":
        if op in prompt:
            a, b = prompt.rstrip("=").split(op)
            return f"{op}{len(a)}x{len(b)}"
    raise ValueError(f"not an arithmetic prompt: {prompt!r}")


def make_splits(
    seed: int = 0,
    num_train: int = 2000,
    num_heldout: int = 200,
    num_warm_start: int = 0,
    num_validation: int = 0,
) -> Splits:
    """Disjoint problem sets with the same difficulty mix.

    All problems are drawn as one pool of distinct problems and dealt out to the splits class by
    class (`difficulty_class`), so every split holds each class in proportion to its size,
    within a problem or two. (Drawing each split on its own, excluding the earlier ones, gives
    the first split most of the few single-digit problems: 255 exist, and a pool of thousands
    asks for more.)
    The pool, and so every split, depends on all four sizes.
    """
    sizes = {
        "heldout": num_heldout,
        "train": num_train,
        "sft": num_warm_start,
        "val": num_validation,
    }
    if min(sizes.values()) < 0:
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    pool = make_problems(sum(sizes.values()), seed, "pool")
    rng = np.random.default_rng([seed, zlib.crc32(b"deal")])
    # Class-sorted (random within a class), then dealt like a Bresenham line: each problem goes
    # to the split furthest behind its share, which gives every run of one class to the splits
    # in proportion to their sizes and every split exactly its size.
    within = rng.permutation(len(pool))
    order = sorted(range(len(pool)), key=lambda i: (difficulty_class(pool[i]["prompt"]), within[i]))
    names = [n for n in sizes if sizes[n] > 0]
    share = np.array([sizes[n] for n in names], np.float64) / max(1, len(pool))
    dealt: dict[str, list[dict[str, str]]] = {n: [] for n in sizes}
    counts = np.zeros(len(names))
    for done, i in enumerate(order):
        j = int(np.argmax(share * (done + 1) - counts))
        counts[j] += 1
        dealt[names[j]].append(pool[i])
    out = {}
    for name, records in dealt.items():
        assert len(records) == sizes[name], (name, len(records), sizes[name])
        records = [records[k] for k in rng.permutation(len(records))]  # any prefix is a sample
        out[name] = [{**r, "id": f"arith-{name}-{k:05d}"} for k, r in enumerate(records)]
    return Splits(out["train"], out["heldout"], out["sft"], out["val"])


def extract_answer(response: str) -> str:
    """The response up to the first whitespace-separated token, stripped (an exact answer)."""
    parts = response.strip().split()
    return parts[0] if parts else ""


def verify(responses: list[str], answers: list[str]) -> np.ndarray:
    """Exact-answer verifier: [len] bool."""
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    return np.array(
        [extract_answer(r) == a.strip() for r, a in zip(responses, answers, strict=True)],
        dtype=bool,
    )


def with_label_noise(records: list[dict[str, str]], rate: float, seed: int) -> list[dict[str, str]]:
    """A copy of `records` in which a share `rate` of the answers has one digit replaced by a
    different one: supervised data with systematic mistakes, as hand- or model-written data has.
    A model fit to it samples a wrong digit now and then on every problem, a behaviour that RL
    against the exact verifier can unlearn in general (and so on held-out problems too)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"label noise rate must be in [0, 1), got {rate}")
    rng = np.random.default_rng([seed, zlib.crc32(b"label-noise")])
    out = []
    for r in records:
        answer = r["answer"]
        if rng.random() < rate:
            i = int(rng.integers(len(answer)))
            wrong = (
                str((int(answer[i]) + int(rng.integers(1, 10))) % 10)
                if answer[i].isdigit()
                else answer[i]
            )
            answer = answer[:i] + wrong + answer[i + 1 :]
        out.append({**r, "answer": answer})
    return out


def corpus(records: list[dict[str, str]]) -> list[str]:
    """Text lines to train the task's tokenizer on."""
    return [r["prompt"] + r["answer"] for r in records]


def train_tokenizer(records: list[dict[str, str]], out_dir: str) -> str:
    """Trains a character-level SentencePiece model on the task's text (0.1 s); returns its path.

    Every digit and operator is its own token (no dummy whitespace prefix), ids: pad 0, unk 1,
    bos 2, eos 3.
    """
    import os
    import tempfile

    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    chars = sorted(set("".join(corpus(records))))
    # Trained beside its place, then moved in whole: the processes of a multi-process run may
    # all train it (the result is deterministic) without one reading another's partial file.
    tmp = tempfile.mkdtemp(prefix=".arith_sp-", dir=out_dir)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(records)),
        model_prefix=os.path.join(tmp, "arith_sp"),
        model_type="char",
        vocab_size=len(chars) + 4,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        add_dummy_prefix=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    for suffix in (".vocab", ".model"):  # the .model last: its presence means "trained"
        os.replace(
            os.path.join(tmp, "arith_sp" + suffix), os.path.join(out_dir, "arith_sp" + suffix)
        )
    os.rmdir(tmp)
    return os.path.join(out_dir, "arith_sp.model")
