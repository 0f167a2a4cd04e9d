"""The math RLVR task (data.task = "math"): local prompt files, HF tokenizer, MathVerifier. [host]

    task = build_math_task(config, workdir)      # a trainer.Task
    task.encode_prompt(problem)                  # Qwen2.5-Math chat prompt -> token ids (cached)
    task.verify(responses, answers)              # [N] bool, MathVerifier-backed
    task.benchmarks                              # {name: records} from config.eval.benchmarks

Nothing is downloaded: the training records come from ``data.train_path`` (JSONL, Parquet or a
TFDS dataset prepared under ``data.tfds_data_dir``), the tokenizer from ``tokenizer.path`` or else
the model folder ``model.path``. A missing path fails at run start with a message naming the field
and the flag that sets it (``require_math_paths``); ``get_config()`` itself never checks paths, so
the paper configs can be loaded, validated and compiled abstractly without any files.

Prompts: the problem as the user turn after the Qwen2.5-Math system prompt ("Please reason step by
step, and put your final answer within \\boxed{}."), rendered by the tokenizer's own chat template
(``data.templates.format_prompt``); tokenizers without one get the plain-text template. The
records keep the raw problem; ``encode_prompt`` formats and tokenises it (memoised per text).
When the template ends turns with ``<|im_end|>`` that token is added to the EOS ids: the base
Qwen2.5-Math tokenizers list only ``<|endoftext|>``, and a chat-formatted response ends its turn
with ``<|im_end|>`` (without this, every response runs to max_new_tokens).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dynamo_jax import trainer
from dynamo_jax.config import ConfigError
from dynamo_jax.data import sources
from dynamo_jax.data.templates import QWEN_MATH_SYSTEM, format_prompt

END_OF_TURN = "<|im_end|>"


# ------------------------------------------------------------------------------------------------
# Required paths
# ------------------------------------------------------------------------------------------------
def require_math_paths(config: Any, *, need_train: bool = True) -> None:
    """Raise ConfigError naming each missing/unusable path a math run needs.

    Required: ``data.train_path`` (unless ``need_train`` is False, e.g. for evaluation only);
    ``model.path`` (a local Hugging Face folder), except that a random-init smoke run may leave it
    empty when ``tokenizer.path`` is given. Paths that are set must exist.
    """
    errors: list[str] = []
    d = config.data
    if need_train:
        if not d.train_path:
            example = {"jsonl": "/path/train.jsonl", "parquet": "/path/train.parquet"}.get(
                d.source, "my_math_dataset"
            )
            errors.append(
                f"data.train_path is required for data.task='math': pass "
                f"--config.data.train_path={example}"
                + (" (a TFDS dataset name)" if d.source == "tfds" else "")
            )
        elif d.source == "tfds":
            if not d.tfds_data_dir:
                errors.append(
                    "data.tfds_data_dir is required for data.source='tfds': pass "
                    "--config.data.tfds_data_dir=/path/to/tensorflow_datasets (prepared locally)"
                )
            elif not os.path.isdir(d.tfds_data_dir):
                errors.append(f"data.tfds_data_dir={d.tfds_data_dir!r} is not a directory")
        elif not os.path.isfile(d.train_path):
            errors.append(f"data.train_path={d.train_path!r}: no such file")
    model_path, tok_path = config.model.path, config.tokenizer.path
    if not model_path and not tok_path:
        errors.append(
            "model.path is required for data.task='math': pass "
            "--config.model.path=/path/to/model (a local Hugging Face folder such as "
            "Qwen2.5-Math-7B: config.json, *.safetensors and the tokenizer; nothing is "
            "downloaded). A random-init "
            "smoke run may instead pass --config.tokenizer.path=/path/to/tokenizer."
        )
    if model_path and not os.path.isfile(os.path.join(model_path, "config.json")):
        errors.append(f"model.path={model_path!r} has no config.json (a Hugging Face folder)")
    if tok_path and not os.path.exists(tok_path):
        errors.append(f"tokenizer.path={tok_path!r} does not exist")
    if errors:
        raise ConfigError("Cannot start the math run:\n  - " + "\n  - ".join(errors))


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------
def _fields(config: Any) -> dict[str, str]:
    d = config.data
    return {"id": d.id_field, "prompt": d.prompt_field, "answer": d.answer_field}


def load_train_records(config: Any) -> list[dict[str, str]]:
    """{id, prompt, answer} records from ``data.source`` / ``data.train_path`` (no download)."""
    d = config.data
    fields = _fields(config)
    # Rows without the id column are numbered ("<file stem>:<row>"), stable across runs.
    if d.source == "jsonl":
        source: Any = sources.JsonlSource(d.train_path, fields, derive_ids=True)
    elif d.source == "parquet":
        source = sources.ParquetSource(d.train_path, fields, derive_ids=True)
    elif d.source == "tfds":
        source = sources.TfdsSource(d.train_path, d.tfds_data_dir, d.split, fields, derive_ids=True)
    else:
        raise ConfigError(f"data.source = {d.source!r}; choose one of jsonl, parquet, tfds")
    records = source.load()
    if not records:
        raise sources.DataError(f"data.train_path={d.train_path!r} holds no records")
    return records


def parse_benchmarks(spec: str) -> dict[str, str]:
    """``"AIME24=/p/aime24.jsonl,MATH500=/p/math500.jsonl"`` -> {name: path}, in order (a path
    may carry its own columns, ``/p/amc23.jsonl?prompt=question``: see `benchmark_source`)."""
    out: dict[str, str] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(
                f"eval.benchmarks entry {item!r} is not name=path (e.g. "
                "--config.eval.benchmarks=AIME24=/data/aime24.jsonl,MATH500=/data/math500.jsonl)"
            )
        if name in out:
            raise ConfigError(f"eval.benchmarks names {name!r} twice")
        out[name] = path
    return out


def benchmark_source(name: str, spec: str, default_fields: dict[str, str]) -> tuple[str, Any]:
    """(path, source) for one ``eval.benchmarks`` entry's value: ``path`` or
    ``path?prompt=<column>&answer=<column>&id=<column>``. Benchmark files name their columns
    differently (MATH-500 "problem", AMC23 "question"), so each entry may name its own; columns
    it does not name are the data.*_field ones. ``.parquet`` files are read as Parquet,
    anything else as JSONL."""
    path, _, query = spec.partition("?")
    fields = dict(default_fields)
    for item in (q for q in query.split("&") if q):
        key, sep, column = item.partition("=")
        if key not in fields or not sep or not column:
            raise ConfigError(
                f"eval.benchmarks: {name}={spec!r}: {item!r} is not key=column with key one of "
                f"{sorted(fields)} (e.g. {name}={path}?prompt=question&answer=answer)"
            )
        fields[key] = column
    if not os.path.isfile(path):
        raise ConfigError(f"eval.benchmarks: {name}={path!r}: no such file")
    if path.endswith(".parquet"):
        return path, sources.ParquetSource(path, fields, derive_ids=True)
    return path, sources.JsonlSource(path, fields, derive_ids=True)


def load_benchmarks(config: Any) -> dict[str, list[dict[str, str]]]:
    """{name: records} for ``eval.benchmarks`` (JSONL or Parquet files; columns from the entry's
    ``?prompt=..&answer=..&id=..`` or else data.*_field; rows without an id are numbered)."""
    fields = _fields(config)
    out: dict[str, list[dict[str, str]]] = {}
    for name, spec in parse_benchmarks(config.eval.benchmarks).items():
        path, source = benchmark_source(name, spec, fields)
        try:
            out[name] = source.load()
        except sources.DataError as e:
            raise sources.DataError(
                f"eval.benchmarks: {name}: {e} (or name this benchmark's own columns in its "
                f"entry: {name}={path}?prompt=<column>&answer=<column>)"
            ) from e
        if not out[name]:  # fail at start, not at the first evaluation (after model loading)
            raise sources.DataError(f"eval.benchmarks: {name}={path!r} holds no problems")
    return out


# ------------------------------------------------------------------------------------------------
# Tokenizer and prompts
# ------------------------------------------------------------------------------------------------
class _ExtraEos:
    """A tokenizer view whose ``eos_ids`` include extra ids; everything else is delegated."""

    def __init__(self, tokenizer: Any, extra: Sequence[int]):
        self._tok = tokenizer
        self._eos = tuple(dict.fromkeys([*tokenizer.eos_ids, *extra]))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def format_math_prompt(tokenizer: Any, problem: str, system: str | None = QWEN_MATH_SYSTEM) -> str:
    """The Qwen2.5-Math prompt text for one problem (chat template when the tokenizer has one)."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is not None:
        return format_prompt(hf, problem, system=system)
    # SentencePiece and other adapters: their apply_chat_template takes (messages, add_gen...).
    return format_prompt(None, problem, system=system)


def math_prompt_encoder(tokenizer: Any, system: str | None = QWEN_MATH_SYSTEM):
    """A memoised ``problem -> token ids`` for the Qwen2.5-Math prompt."""
    cache: dict[str, list[int]] = {}

    def encode(problem: str) -> list[int]:
        ids = cache.get(problem)
        if ids is None:
            # BOS as the model's own tokenizer adds it (a chat template's own BOS is not
            # doubled); a Llama prompt without a template started without one.
            text = format_math_prompt(tokenizer, problem, system)
            ids = tokenizer.encode(text, add_bos=getattr(tokenizer, "adds_bos", False))
            cache[problem] = ids
        return ids

    return encode


def load_math_tokenizer(config: Any) -> Any:
    """The tokenizer from ``tokenizer.path`` (else ``model.path``), with the chat template's
    end-of-turn token added to its EOS ids."""
    from dynamo_jax.tokenizer import load_tokenizer

    path = config.tokenizer.path or config.model.path
    if not path:
        require_math_paths(config, need_train=False)
    tok = load_tokenizer(path)
    hf = getattr(tok, "hf_tokenizer", None)
    if hf is not None and END_OF_TURN in format_math_prompt(tok, "1+1"):
        end = hf.convert_tokens_to_ids(END_OF_TURN)
        if isinstance(end, int) and end >= 0 and end != hf.unk_token_id:
            tok = _ExtraEos(tok, [end])
    return tok


# ------------------------------------------------------------------------------------------------
# Verifier
# ------------------------------------------------------------------------------------------------
class MathVerify:
    """``(responses, gold answers) -> [N] bool`` over a MathVerifier worker pool.

    Rows whose gold answer is empty (padding rows) are scored False without being sent to the
    pool. ``last`` keeps the latest VerifyResult-like details (extracted answers, statuses) for
    callers that want them; ``details(responses, answers)`` returns them directly.
    """

    def __init__(self, num_workers: int | None = None, time_limit: float = 5.0):
        from dynamo_jax.rewards.math import MathVerifier

        kw = {} if num_workers is None else {"num_workers": num_workers}
        self.verifier = MathVerifier(time_limit=time_limit, **kw)
        self.last = None  # the latest VerifyResult (padding rows left out): .metrics(), .status

    def details(self, responses: Sequence[str], answers: Sequence[str]):
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        keep = [i for i, a in enumerate(answers) if str(a) != ""]
        result = self.verifier([responses[i] for i in keep], [str(answers[i]) for i in keep])
        self.last = result
        correct = np.zeros(len(responses), bool)
        correct[keep] = result.correct
        extracted: list[str | None] = [None] * len(responses)
        for j, i in enumerate(keep):
            extracted[i] = result.answers[j]
        return correct, extracted, result

    def __call__(self, responses: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        return self.details(responses, answers)[0]

    def close(self) -> None:
        self.verifier.close()


# ------------------------------------------------------------------------------------------------
# The task
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MathTask(trainer.Task):
    """A trainer.Task whose prompts are raw problems, chat-formatted when encoded."""

    benchmarks: dict[str, list[dict[str, str]]] = dataclasses.field(default_factory=dict)
    prompt_encoder: Callable[[str], list[int]] | None = None

    def encode_prompt(self, text: str) -> list[int]:
        if self.prompt_encoder is None:
            self.prompt_encoder = math_prompt_encoder(self.tokenizer)
        return self.prompt_encoder(text)

    def close(self) -> None:
        if hasattr(self.verify, "close"):
            self.verify.close()


def _with_benchmark_ids(benchmarks: Mapping[str, list[dict[str, str]]]) -> list[dict[str, str]]:
    return [
        {**r, "id": f"{name}:{r['id']}", "benchmark": name}
        for name, records in benchmarks.items()
        for r in records
    ]


def warm_start_split(
    config: Any, train: Sequence[dict[str, str]]
) -> tuple[list[dict[str, str]] | None, list[dict[str, str]] | None]:
    """(warm-start examples, validation) for a warm start with an early stop, else (None, None).

    A supervised warm start that stops at ``sft.target_accuracy`` needs problems it has not
    trained on, and that the run does not report (the benchmarks). It gets ``eval.num_prompts``
    training problems, drawn with ``data.seed``, and trains on the rest. RL still samples from
    every training problem: the early stop is the only thing scored on the validation problems.
    """
    if config.sft.steps <= 0 or config.sft.target_accuracy <= 0:
        return None, None
    n = config.eval.num_prompts
    if n >= len(train):
        raise ConfigError(
            f"sft.target_accuracy = {config.sft.target_accuracy} scores the warm start on "
            f"eval.num_prompts = {n} training problems it does not train on, but "
            f"data.train_path={config.data.train_path!r} holds {len(train)}: lower "
            "eval.num_prompts, or set sft.target_accuracy=0 to train for sft.steps"
        )
    order = np.random.default_rng(config.data.seed).permutation(len(train))
    held = set(order[:n].tolist())
    examples = [r for i, r in enumerate(train) if i not in held]
    return examples, [train[i] for i in sorted(held)]


def build_math_task(
    config: Any, workdir: str | None = None, *, verifier_workers: int | None = None
) -> MathTask:
    """The Task for ``data.task == "math"`` (see the module docstring).

    ``heldout`` is every benchmark problem in ``eval.benchmarks`` order (ids prefixed with the
    benchmark name), so the trainer's plain held-out accuracy works unchanged; ``benchmarks``
    keeps them per benchmark for ``evaluation.evaluate_benchmarks``. ``workdir`` is unused (the
    signature matches the trainer's task builders). ``verifier_workers=0`` scores in-process.
    """
    del workdir
    if config.data.task != "math":
        raise ConfigError(f"build_math_task needs data.task='math', got {config.data.task!r}")
    require_math_paths(config)
    train = load_train_records(config)
    sft_examples, validation = warm_start_split(config, train)
    benchmarks = load_benchmarks(config) if config.eval.benchmarks else {}
    tokenizer = load_math_tokenizer(config)
    return MathTask(
        train=train,
        heldout=_with_benchmark_ids(benchmarks),
        sft_examples=sft_examples,
        validation=validation,
        tokenizer=tokenizer,
        verify=MathVerify(verifier_workers),
        max_new_tokens=config.sampling.max_new_tokens,
        benchmarks=benchmarks,
        prompt_encoder=math_prompt_encoder(tokenizer),
    )
