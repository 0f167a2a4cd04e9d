"""The DynaMO RL loop: allocate -> sample -> verify -> stats -> update -> log/save (SPEC 5).

Host-side Python decides what to sample (allocation, rewards, statistics); the device does the
heavy, pure, sharded work (sampling, log-probs, the update). Data flows one way per step:

    records      = next(iterator)                         # N prompts {id, prompt, answer}
    n            = policy.allocate(stats, ids)            # SPEC 1.3, sum n = B
    rollouts     = sampler.generate(params, prompts, n)   # rows carry prompt/group ids
    correct      = verify(responses, answers[group_id])   # aligned by group id, never position
    stats.update(ids, n, correct per group)               # the same aligned arrays
    state, m     = train_step.update(state, batch)
    writer.write(...); checkpointer.save(...)

A run is `train(config, workdir)`; started again with the same workdir it resumes from the latest
checkpoint (train state, PromptStats, allocation snapshot, data position) and produces the same
metrics as an uninterrupted run (timings aside).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamo_jax import buckets as bk
from dynamo_jax import checkpoint as ckpt_lib
from dynamo_jax import compilation
from dynamo_jax import config as config_lib
from dynamo_jax import sharding as shd
from dynamo_jax import train_step as ts
from dynamo_jax.allocation import AllocationPolicy, PromptStats
from dynamo_jax.data.iterator import PromptIterator, records_digest
from dynamo_jax.data.sources import DataError
from dynamo_jax.metrics import MetricsWriter
from dynamo_jax.models.config import UnsupportedConfigError
from dynamo_jax.sampling import FINISH_LENGTH, Sampler

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def out_of_memory_advice(config: Any, where: str) -> str:
    """What to change when ``where`` ran out of device memory: the config fields that bound a
    step's memory, with their current values (``memory_plan.memory_advice``)."""
    from dynamo_jax.memory_plan import memory_advice

    return (
        f"{where} ran out of device memory. {memory_advice(config)} XLA's own message is the "
        "cause shown above; `python -m experiments.plan_memory --config ...` shows the plan "
        "per device before a run."
    )


@contextlib.contextmanager
def explain_out_of_memory(config: Any, where: str):
    """Re-raises a device out-of-memory error (XLA's RESOURCE_EXHAUSTED) as a MemoryError whose
    message names the config fields to change; any other error passes through unchanged."""
    try:
        yield
    except Exception as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        raise MemoryError(out_of_memory_advice(config, where)) from err


class RunError(ValueError):
    """A run that cannot go on as configured; the message names the fields, files or rows and
    what to change."""


@dataclasses.dataclass
class Task:
    """What the loop needs from a task: prompts, a tokenizer and a verifier."""

    train: list[dict[str, str]]
    heldout: list[dict[str, str]]
    tokenizer: Any
    verify: Callable[[list[str], list[str]], np.ndarray]
    max_new_tokens: int
    sft_examples: list[dict[str, str]] | None = None  # supervised warm-start data
    # What the warm start's early stop (sft.target_accuracy) is scored on: problems of the
    # held-out set's distribution that are neither trained on nor reported. None: the held-out
    # set (tasks without a validation split; the run's log says so).
    validation: list[dict[str, str]] | None = None

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)


def build_task(config: Any, workdir: str) -> Task:
    if config.data.task == "arithmetic":
        from dynamo_jax.tasks import arithmetic
        from dynamo_jax.tokenizer import load_tokenizer

        # One pool dealt into four disjoint splits with the same difficulty mix. The warm-start
        # pool (disjoint from the RL and held-out prompts: RL then works on problems the model
        # has not memorised, like the held-out ones) and the validation slice that stops the warm
        # start early are drawn even when no warm start runs, so that the held-out set does not
        # depend on sft.steps.
        try:
            splits = arithmetic.make_splits(
                config.data.seed,
                config.data.num_train,
                config.data.num_heldout,
                num_warm_start=config.sft.num_examples,
                num_validation=config.data.num_heldout,
            )
        except ValueError as err:
            raise RunError(
                f"data.num_train = {config.data.num_train}, data.num_heldout = "
                f"{config.data.num_heldout} (twice: held-out and the warm start's validation "
                f"slice) and sft.num_examples = {config.sft.num_examples} ask for more distinct "
                f"arithmetic problems than the task has ({err}): lower them."
            ) from None
        train, heldout = splits.train, splits.heldout
        path = config.tokenizer.path or os.path.join(workdir, "tokenizer", "arith_sp.model")
        if not os.path.exists(path):
            path = arithmetic.train_tokenizer(train, os.path.dirname(path))
        sft_pool = splits.warm_start if config.sft.steps > 0 else None
        if sft_pool is not None and config.sft.label_noise > 0:
            sft_pool = arithmetic.with_label_noise(
                sft_pool, config.sft.label_noise, config.data.seed
            )
        tokenizer = load_tokenizer(path)
        _check_encodes_exactly(
            tokenizer,
            path,
            config,
            (
                ("held-out", heldout),
                ("training", train),
                ("warm-start", sft_pool or []),
                ("validation", splits.validation),
            ),
        )
        return Task(
            train,
            heldout,
            tokenizer,
            arithmetic.verify,
            config.sampling.max_new_tokens,
            sft_pool,
            splits.validation,
        )
    if config.data.task == "math":
        from dynamo_jax.math_task import build_math_task

        return build_math_task(config, workdir)
    raise ValueError(f"data.task = {config.data.task!r}: choose 'arithmetic' or 'math'.")


# Errors whose message names the field, file or row and what to do: entry points print the
# message alone (a traceback would bury it).
USER_ERRORS = (
    config_lib.ConfigError,
    DataError,
    UnsupportedConfigError,
    RunError,
    MemoryError,
    FileNotFoundError,  # a model, tokenizer or data path (the message names it)
)


def _check_encodes_exactly(tokenizer: Any, path: str, config: Any, splits) -> None:
    """Every prompt and answer of the arithmetic task must survive encode -> decode. The task's
    tokenizer learns its characters from the training problems, and a small data.num_train can
    miss one: the held-out prompts and answers that hold it would become <unk>, which decodes to
    nothing, so those answers could never be produced and held-out accuracy would be capped
    without a word."""
    for split, records in splits:
        for record in records:
            for field in ("prompt", "answer"):
                text = record[field]
                if tokenizer.decode(tokenizer.encode(text)) != text:
                    missing = sorted(
                        {c for c in text if tokenizer.decode(tokenizer.encode(c)) != c}
                    )
                    raise RunError(
                        f"the tokenizer {path} cannot encode the {split} {field} {text!r} "
                        f"(record {record['id']!r}; characters it lacks: {missing}). The task's "
                        f"tokenizer is trained on the training problems (data.num_train = "
                        f"{config.data.num_train}): raise data.num_train, or delete {path} "
                        "(or point tokenizer.path at one that covers every character) and "
                        "start again."
                    )


def check_mesh_fits(config: Any, mesh: Any) -> None:
    """The step's rollouts split evenly over the mesh's row shards (mesh.data * mesh.fsdp).

    The sampler rounds its rows up to a multiple of the row shards; with a budget B that is not
    one, the update would get padding rows it cannot split into its micro-batches, and the run
    would fail after the warm start and the first evaluation instead of here."""
    shards = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
    budget = config.prompts_per_step * config.rollouts_per_prompt
    if budget % shards == 0:
        return
    devices = int(np.prod(list(mesh.shape.values())))
    fits = [d for d in range(1, devices + 1) if devices % d == 0 and budget % d == 0]
    raise RunError(
        f"The step's {budget} rollouts (prompts_per_step = {config.prompts_per_step} x "
        f"rollouts_per_prompt = {config.rollouts_per_prompt}) do not split over the mesh's "
        f"{shards} row shards (mesh.data = {mesh.shape['data']} x mesh.fsdp = "
        f"{mesh.shape['fsdp']}, on {devices} devices). Make mesh.data * mesh.fsdp one of "
        f"{fits} (and give the other devices to mesh.tensor), or change prompts_per_step or "
        f"rollouts_per_prompt so that their product is a multiple of {shards}."
    )


def check_task_fits(config: Any, task: Task, log: Callable[[str], None]) -> None:
    """Before anything trains: enough training prompts for one step, and every prompt fits the
    largest prompt bucket (nothing is truncated, and a step that met a longer prompt would
    fail mid-run). Notes the evaluation settings the data caps."""
    n = len(task.train)
    if n < config.prompts_per_step:
        source = config.data.train_path if config.data.task == "math" else "data.num_train"
        raise RunError(
            f"prompts_per_step = {config.prompts_per_step} but the training data ({source}) "
            f"holds {n} prompts: lower prompts_per_step or add prompts."
        )
    longest = max(config.buckets.prompt_len)
    for split, records in (("training", task.train), ("held-out", task.heldout)):
        for record in records:
            length = len(task.encode_prompt(record["prompt"]))
            if length > longest:
                raise RunError(
                    f"{split} prompt {record['id']!r} is {length} tokens long, more than the "
                    f"largest prompt bucket (buckets.prompt_len = {list(config.buckets.prompt_len)}"
                    f"): add a bucket of at least {length} tokens, or remove that prompt "
                    "(prompts are never truncated)."
                )
    e = config.eval
    if e.num_prompts > len(task.heldout) and not getattr(task, "benchmarks", None):
        log(f"note: eval.num_prompts = {e.num_prompts}, the held-out set has {len(task.heldout)}")
    k = 1 if e.greedy else e.samples_per_prompt
    if getattr(task, "benchmarks", None) and e.pass_k > k:
        log(f"note: eval.pass_k = {e.pass_k} > {k} samples per problem: reporting pass@{k}")


def _hf_architecture(config: Any, tokenizer: Any) -> dict[str, Any]:
    arch = dict(
        config.model.architecture.to_dict()
        if hasattr(config.model.architecture, "to_dict")
        else config.model.architecture
    )
    arch.setdefault("vocab_size", int(tokenizer.vocab_size))
    if arch["vocab_size"] < tokenizer.vocab_size:
        raise RunError(
            f"model.architecture.vocab_size = {arch['vocab_size']} is smaller than the "
            f"tokenizer's vocabulary ({tokenizer.vocab_size})"
        )
    return arch


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config (ConfigDict or the dicts of its JSON) as {dotted.key: value}."""
    flat: dict[str, Any] = {}
    if hasattr(node, "items"):
        for k, v in node.items():
            flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        flat[prefix] = list(node) if isinstance(node, tuple | list) else node
    return flat


# The config sections that decide what the cached warm start is.
_WARM_START_FIELDS = ("model", "tokenizer", "data", "sft")


def _warm_start_records(task: Task) -> tuple[list[Any], list[Any]]:
    """(what the warm start trains on, what its early stop is scored on)."""
    examples = task.sft_examples or task.train
    return examples, task.validation if task.validation else task.heldout


def warm_start_fingerprint(config: Any, task: Task | None = None) -> dict[str, Any]:
    """The config fields a cached warm start was made with (JSON-able, flat dotted keys), and
    with `task` a digest of the records it trained on and was stopped by: the config alone does
    not pin those down (the arithmetic splits were once drawn differently from the same
    settings)."""
    flat: dict[str, Any] = {}
    for section in _WARM_START_FIELDS:
        flat.update(_flatten(config[section], section))
    for unused in ("model.path", "model.remat"):  # change nothing the warm start learned
        flat.pop(unused, None)
    if config.sft.target_accuracy > 0:  # when it stops depends on how its accuracy is scored
        everything = _flatten(config)
        flat.update({key: everything[key] for key in _EARLY_STOP_FIELDS})
    if task is not None and config.sft.steps > 0:
        examples, scored = _warm_start_records(task)
        stop = scored[: config.eval.num_prompts] if config.sft.target_accuracy > 0 else []
        flat[_DATA_DIGEST] = records_digest([examples, stop])
    return json.loads(json.dumps(flat))


# The fingerprint's hash of the warm start's training records and early-stop records.
_DATA_DIGEST = "data.warm_start_digest"

# The settings of the (validation) accuracy that stops a warm start at sft.target_accuracy.
_EARLY_STOP_FIELDS = (
    "eval.num_prompts",
    "eval.samples_per_prompt",
    "eval.greedy",
    "sampling.temperature",
    "sampling.max_new_tokens",
)


def config_changes(saved_json: str, config: Any) -> list[str]:
    """`key: before -> now` for every field that differs between the config a checkpoint was
    saved with (its JSON) and `config` (sorted; fields only one side has are listed too)."""
    before = _flatten(json.loads(saved_json))
    now = _flatten(json.loads(config.to_json()))
    missing = object()
    return [
        f"{key}: {before.get(key, '(absent)')} -> {now.get(key, '(absent)')}"
        for key in sorted(set(before) | set(now))
        if before.get(key, missing) != now.get(key, missing)
    ]


def check_warm_start(sft_dir: str, fingerprint: dict[str, Any]) -> None:
    """Raise if the cached warm start in `sft_dir` was made with other settings than these."""
    path = os.path.join(sft_dir, "sft_summary.json")
    saved = json.load(open(path)).get("fingerprint") if os.path.exists(path) else None
    if saved is None:
        return  # made before fingerprints existed: nothing to compare
    # A field the cache did not record (made before it was part of the fingerprint) is not
    # held against it, except the data's digest: without it, what the cache learned from is
    # unknown.
    diff = sorted(k for k in saved if saved.get(k) != fingerprint.get(k))
    if _DATA_DIGEST in fingerprint and _DATA_DIGEST not in saved:
        diff.append(_DATA_DIGEST)
    if diff:
        shown = ", ".join(f"{k}: cached {saved.get(k)!r}, now {fingerprint.get(k)!r}" for k in diff)
        raise RunError(
            f"The cached warm start in {sft_dir} was made with other settings ({shown}). "
            "Use another --workdir, or delete that folder to train the warm start again."
        )


def build_model(config: Any, task: Task, workdir: str, mesh: Any, log: Callable[[str], None]):
    """The policy: a local HF checkpoint, or a random model warm-started by SFT (cached)."""
    from dynamo_jax import models

    dtype = _DTYPES[config.model.dtype]
    param_dtype = _DTYPES[config.model.param_dtype]
    if config.model.path:
        return models.load_pretrained(
            config.model.path,
            dtype=dtype,
            param_dtype=param_dtype,
            mesh=mesh,
            remat=config.model.remat,
        ), {}
    sft_dir = os.path.join(workdir, "sft_model")
    fingerprint = warm_start_fingerprint(config, task)
    examples, scored = _warm_start_records(task)
    if os.path.exists(os.path.join(sft_dir, "config.json")):
        check_warm_start(sft_dir, fingerprint)
        log(f"loading the cached supervised warm start from {sft_dir}")
        model = models.load_pretrained(
            sft_dir, dtype=dtype, param_dtype=param_dtype, mesh=mesh, remat=config.model.remat
        )
        summary_path = os.path.join(sft_dir, "sft_summary.json")
        summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
        return model, summary
    model_cfg = models.ModelConfig.from_hf_dict(_hf_architecture(config, task.tokenizer))
    model = models.init_model(
        model_cfg,
        config.model.seed,
        dtype=dtype,
        param_dtype=param_dtype,
        mesh=mesh,
        remat=config.model.remat,
    )
    summary: dict[str, Any] = {}
    if config.sft.steps > 0:
        from dynamo_jax import sft

        eos = task.tokenizer.eos_ids[0]
        prompts = [task.encode_prompt(r["prompt"]) for r in examples]
        answers = [task.tokenizer.encode(r["answer"]) + [eos] for r in examples]
        sampler = make_sampler(config, model, task, num_rows=None)

        if config.sft.target_accuracy > 0 and not task.validation:
            log(
                "this task has no validation split: the warm start's early stop "
                "(sft.target_accuracy) is scored on the held-out prompts"
            )

        def validation_accuracy(m):
            return evaluate(
                sampler,
                nnx_state(m),
                task,
                scored[: config.eval.num_prompts],
                config,
                jax.random.key(0),
            )["accuracy"]

        t0 = time.perf_counter()
        model, summary = sft.supervised_warm_start(
            model,
            prompts,
            answers,
            steps=config.sft.steps,
            batch_size=config.sft.batch_size,
            learning_rate=config.sft.learning_rate,
            pad_id=task.tokenizer.pad_id,
            seed=config.sft.seed,
            evaluate=validation_accuracy,
            eval_every=config.sft.eval_every,
            target_accuracy=config.sft.target_accuracy,
            log=log,
        )
        summary["sft_seconds"] = time.perf_counter() - t0
        summary["fingerprint"] = fingerprint
        # Every process: the save gathers each tensor across processes (a collective that
        # would block process 0 forever if it ran alone while the parameters are split over
        # processes); only process 0 writes.
        models.save_pretrained(model, sft_dir)
        if jax.process_index() == 0:
            with open(os.path.join(sft_dir, "sft_summary.json"), "w") as f:
                json.dump(summary, f)
    return model, summary


def nnx_state(model: Any) -> Any:
    from flax import nnx

    return nnx.state(model, nnx.Param)


def make_sampler(
    config: Any, model: Any, task: Task, num_rows: int | None, max_prompts: int | None = None
) -> Sampler:
    """The sampler of a run. With `max_prompts` (the most prompts one call can hold) every call
    gets that many prompt slots, so that packing a new allocation into calls, which changes the
    number of prompts per call, never recompiles prefill or decode."""
    spec = bk.BucketSpec(
        prompt_len_buckets=tuple(config.buckets.prompt_len),
        row_buckets=(num_rows,) if num_rows else 64,
        prompt_count_buckets=(bk.choose_multiple(max_prompts, 8),) if max_prompts else 8,
        max_new_tokens=task.max_new_tokens,
    )
    return Sampler(
        model,
        eos_ids=task.tokenizer.eos_ids,
        pad_id=task.tokenizer.pad_id,
        spec=spec,
        vocab_limit=int(task.tokenizer.vocab_size),  # a padded vocabulary's extra ids: never
    )


def rollout_sampler(config: Any, model: Any, task: Task) -> Sampler:
    """The sampler of the RL steps: calls of `sampling.max_rows_per_call` rows (0: the whole
    budget in one call), each with room for as many prompts as a call can hold."""
    n_prompts = config.prompts_per_step
    max_rows = config.sampling.max_rows_per_call
    if max_rows:  # a call holds whole groups of at least this many rollouts each
        uniform = config.allocation.mode == "uniform"
        smallest = config.rollouts_per_prompt if uniform else config.allocation.n_low
        max_prompts = min(n_prompts, max_rows // max(1, smallest))
    else:
        max_prompts = n_prompts
    budget = n_prompts * config.rollouts_per_prompt
    return make_sampler(config, model, task, max_rows or budget, max_prompts)


def pack_prompt_chunks(group_sizes: np.ndarray, max_rows: int) -> list[np.ndarray]:
    """Consecutive prompt index ranges whose rollouts fit `max_rows` rows per sampler call
    (greedy, in order; every group stays whole). 0 = one call for everything."""
    n = np.asarray(group_sizes, np.int64)
    if max_rows <= 0:
        return [np.arange(len(n))]
    if np.any(n > max_rows):
        bad = int(np.argmax(n))
        raise ValueError(
            f"prompt {bad} has {n[bad]} rollouts, more than sampling.max_rows_per_call = "
            f"{max_rows}: raise sampling.max_rows_per_call to at least allocation.n_high."
        )
    chunks, start, rows = [], 0, 0
    for i, size in enumerate(n):
        if rows + size > max_rows:
            chunks.append(np.arange(start, i))
            start, rows = i, 0
        rows += size
    chunks.append(np.arange(start, len(n)))
    return [c for c in chunks if len(c)]


_ROW_FIELDS = (
    "prompt_id",
    "group_id",
    "sample_index",
    "valid",
    "prompt_lengths",
    "response_tokens",
    "response_logp",
    "response_mask",
    "response_lengths",
    "finish_reason",
)


def generate_in_chunks(
    sampler: Sampler,
    params: Any,
    prompts: list[list[int]],
    prompt_ids: np.ndarray,
    group_sizes: np.ndarray,
    key: jax.Array,
    max_rows: int,
    pad_id: int,
    **knobs: Any,
) -> Any:
    """`sampler.generate` over prompt chunks of at most `max_rows` rollouts each, so that the
    KV cache of only one chunk exists at a time (the full rollout batch of a paper-sized step
    does not fit an accelerator's memory). Returns one `Rollouts` holding exactly the valid rows,
    in chunk order, with `group_id` indexing `prompts`. Each row's randomness depends only on
    (key, prompt id, sample index), so the samples are the same as from one call."""
    chunks = pack_prompt_chunks(group_sizes, max_rows)
    outs = []
    for idx in chunks:
        out = sampler.generate(
            params,
            [prompts[i] for i in idx],
            np.asarray(prompt_ids)[idx],
            np.asarray(group_sizes)[idx],
            key,
            **knobs,
        )
        keep = out.valid
        fields = {f: getattr(out, f)[keep] for f in _ROW_FIELDS}
        fields["group_id"] = idx[fields["group_id"]].astype(np.int32)
        fields["prompt_tokens"] = out.prompt_tokens[keep]
        outs.append((out, fields))
    # The sampler keeps one KV-cache buffer per cache shape (prompt-length bucket) for its next
    # call; held through the train update they would add one cache per bucket met to the update's
    # peak, which the memory plan does not count (it counts one cache, while sampling).
    sampler.release_buffers()
    if len(outs) == 1 and max_rows <= 0:
        return outs[0][0]
    plen = max(f["prompt_tokens"].shape[1] for _, f in outs)
    merged = {}
    for name in (*_ROW_FIELDS, "prompt_tokens"):
        parts = [f[name] for _, f in outs]
        if name == "prompt_tokens":  # chunks may fall in different prompt-length buckets
            parts = [
                np.pad(p, ((0, 0), (0, plen - p.shape[1])), constant_values=pad_id) for p in parts
            ]
        merged[name] = np.concatenate(parts, axis=0)
    first = outs[0][0]
    return dataclasses.replace(
        first,
        **merged,
        num_decode_steps=max(o.num_decode_steps for o, _ in outs),
        timings={"total_s": sum(o.timings.get("total_s", 0.0) for o, _ in outs)},
    )


def score_rollouts(
    task: Task, config: Any, records: list[dict[str, str]], out: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(correct [R] bool, rewards [R] float32) of each rollout row against its own record's
    answer (by the row's group id); padding rows are incorrect with reward 0."""
    texts = _decode_rows(task.tokenizer, out)
    valid = out.valid
    answers = [records[g]["answer"] if v else "" for g, v in zip(out.group_id, valid, strict=True)]
    correct = task.verify(texts, answers) & valid
    a = config.advantage
    rewards = np.where(correct, a.correct_reward, a.incorrect_reward).astype(np.float32) * valid
    return correct, rewards


def rollout_batch(out: Any, rewards: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """The train-step batch of a rollout set: left-padded layout + rewards, group ids, valid."""
    batch = ts.batch_from_rollouts(
        out.prompt_tokens, out.prompt_lengths, out.response_tokens, out.response_mask, pad_id
    )
    batch.update(rewards=rewards, group_ids=out.group_id.astype(np.int32), valid=out.valid)
    return batch


def _decode_rows(tokenizer: Any, rollouts: Any) -> list[str]:
    return [
        tokenizer.decode(rollouts.response_tokens[r, : rollouts.response_lengths[r]].tolist())
        for r in range(rollouts.num_rows)
    ]


def evaluate(
    sampler: Sampler,
    params: Any,
    task: Task,
    records: list[dict[str, str]],
    config: Any,
    key: jax.Array,
) -> dict[str, float]:
    """Held-out accuracy (Pass@1): the mean over `eval.samples_per_prompt` samples per problem
    at the sampling temperature (or one greedy answer with `eval.greedy`)."""
    prompts = [task.encode_prompt(r["prompt"]) for r in records]
    k = 1 if config.eval.greedy else config.eval.samples_per_prompt
    out = sampler.generate(
        params,
        prompts,
        np.arange(len(records)),
        np.full(len(records), k, np.int64),
        key,
        temperature=config.sampling.temperature,
        greedy=config.eval.greedy,
    )
    texts = _decode_rows(task.tokenizer, out)
    rows = np.flatnonzero(out.valid)
    correct = task.verify(
        [texts[r] for r in rows], [records[out.group_id[r]]["answer"] for r in rows]
    )
    return {"accuracy": float(np.mean(correct)) if len(rows) else 0.0}


def heldout_metrics(
    config: Any,
    sampler: Sampler,
    params: Any,
    task: Task,
    key: jax.Array,
    out_dir: str | None = None,
    step: int = 0,
) -> dict[str, float]:
    """Held-out metrics; "eval_accuracy" is Pass@1. A task with benchmark files (data.task =
    "math", eval.benchmarks) adds pass@k / maj@k per benchmark and their average as
    "eval/<benchmark>/<metric>" and writes eval_step_<step>.md/.json into `out_dir`."""
    with explain_out_of_memory(config, f"The held-out evaluation at step {step}"):
        try:
            return _heldout_metrics(config, sampler, params, task, key, out_dir, step)
        finally:
            if sampler is not None:  # its KV caches must not stay through the train steps
                sampler.release_buffers()


def _heldout_metrics(config, sampler, params, task, key, out_dir, step) -> dict[str, float]:
    benchmarks = getattr(task, "benchmarks", None)
    if benchmarks:
        from dynamo_jax import evaluation

        k = 1 if config.eval.greedy else config.eval.samples_per_prompt
        _, data = evaluation.evaluate_benchmarks(
            sampler,
            params,
            task.tokenizer,
            benchmarks,
            k,
            config.sampling.temperature,
            getattr(task.verify, "details", task.verify),  # extracted answers feed maj@k
            key,
            encode_prompt=task.encode_prompt,
            pass_k=min(config.eval.pass_k, k),
            top_p=config.sampling.top_p,
            top_k=config.sampling.top_k,
            greedy=config.eval.greedy,
            # the same bound on one call's KV cache as the RL sampling (0 there = the whole step
            # at once; evaluation then keeps its own default)
            max_rows_per_call=config.sampling.max_rows_per_call or 1024,
            out_dir=out_dir if jax.process_index() == 0 else None,
            file_stem=f"eval_step_{step}",
            settings={"step": step},
        )
        return evaluation.flat_metrics(data)
    if not task.heldout:
        return {}
    records = task.heldout[: config.eval.num_prompts]
    return {"eval_accuracy": evaluate(sampler, params, task, records, config, key)["accuracy"]}


def _host_state(
    stats: PromptStats,
    policy: AllocationPolicy,
    iterator: PromptIterator,
    step: int,
    config: Any,
    heldout_before: dict[str, float] | None = None,
) -> dict[str, Any]:
    return {
        "step": step,
        "prompt_stats": stats.state_dict(),
        "allocation_policy": policy.state_dict(),
        "iterator": iterator.state(),
        "config": config.to_json(),
        # the held-out result before RL, which a resumed run reports in summary.json
        "heldout_before": heldout_before or {},
    }


@dataclasses.dataclass
class RLParts:
    """What one RL step needs besides the config and the task (`_rl_step`'s arguments)."""

    sampler: Sampler
    step_fn: ts.TrainStep
    state: ts.TrainState
    stats: PromptStats
    policy: AllocationPolicy
    iterator: PromptIterator
    index_of: dict[Any, int]


def build_rl_parts(config: Any, model: Any, task: Task, mesh: Any) -> RLParts:
    """The rollout sampler, the compiled step and a fresh train state from `model`, and the
    host-side allocation state and data iterator: everything `train` (and the step benchmark)
    drives `_rl_step` with."""
    n_prompts = config.prompts_per_step
    sampler = rollout_sampler(config, model, task)
    tx = ts.make_optimizer(config)
    graphdef, rest, state = ts.init_train_state(model, tx, with_reference=config.loss.kl_coef > 0)
    # The loss's distribution is the sampler's: over the tokenizer's ids.
    settings = ts.StepSettings.from_config(
        config, num_groups=n_prompts, vocab_limit=int(task.tokenizer.vocab_size)
    )
    step_fn = ts.TrainStep(
        graphdef, rest, tx, settings, ts.state_shardings(state), shd.batch_sharding(mesh)
    )
    return RLParts(
        sampler=sampler,
        step_fn=step_fn,
        state=state,
        stats=PromptStats(),
        policy=AllocationPolicy.from_config(config),
        iterator=PromptIterator(task.train, batch_size=n_prompts, seed=config.data.seed),
        index_of={r["id"]: i for i, r in enumerate(task.train)},
    )


def _changed_settings(host: dict[str, Any], config: Any) -> list[str]:
    """`config_changes` against the config a checkpoint's host state recorded ([] if none)."""
    return config_changes(host["config"], config) if "config" in host else []


def _cannot_resume(reason: str, changed: list[str]) -> RunError:
    return RunError(
        f"Cannot resume: {reason}. The settings that differ from the checkpoint's:\n  "
        + ("\n  ".join(changed) or "(none recorded)")
        + "\nResume with the checkpoint's settings for these, or use another --workdir."
    )


def is_main_process() -> bool:
    """Process 0 of a multi-process run (the one that writes metrics, summaries and logs)."""
    return jax.process_index() == 0


def train(
    config: Any, workdir: str, *, progress: bool = True, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Runs (or resumes) the RL job; returns a summary with held-out accuracy before/after."""
    config_lib.validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    # Before anything else touches JAX: jax.distributed must start before the backend does.
    # Unset fields (the defaults) let jax auto-detect a TPU pod, SLURM or Open MPI launch.
    d = config.distributed
    shd.initialize_distributed(
        d.coordinator_address or None,
        d.num_processes or None,
        d.process_id if d.process_id >= 0 else None,
    )
    is_main = is_main_process()
    log = log or (lambda msg: print(msg, flush=True) if is_main else None)
    m = config.mesh
    try:
        mesh = shd.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor)
    except ValueError as err:
        raise RunError(
            f"mesh.data = {m.data}, mesh.fsdp = {m.fsdp}, mesh.tensor = {m.tensor} do not fit "
            f"the {jax.device_count()} devices here ({err}); -1 takes the devices left over."
        ) from None
    check_mesh_fits(config, mesh)
    compilation.install()
    # The task (a math task's verifier processes) and the checkpoint manager (Orbax's threads)
    # are closed however the run ends: a caller that catches a refused resume or an
    # out-of-memory error, as a notebook does, keeps no workers or pending reads behind.
    with contextlib.ExitStack() as cleanup:
        return _train(config, workdir, mesh, cleanup, progress=progress, log=log)


def _train(
    config: Any,
    workdir: str,
    mesh: Any,
    cleanup: contextlib.ExitStack,
    *,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    is_main = is_main_process()
    task = build_task(config, workdir)
    if hasattr(task, "close"):
        cleanup.callback(task.close)
    check_task_fits(config, task, log)
    model, sft_summary = build_model(config, task, workdir, mesh, log)
    whole = shd.replicated_dimensions(model, mesh)
    if whole:
        log(
            "note: these parameter dimensions do not divide their mesh axis, so every device "
            "of that axis holds them whole (more memory than the mesh suggests):\n  "
            + "\n  ".join(whole)
        )
    eval_sampler = make_sampler(config, model, task, num_rows=None)
    parts = build_rl_parts(config, model, task, mesh)
    del model
    sampler, step_fn, state = parts.sampler, parts.step_fn, parts.state
    stats, policy, iterator, index_of = parts.stats, parts.policy, parts.iterator, parts.index_of
    checkpointer = ckpt_lib.RunCheckpointer(
        os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints
    )
    cleanup.callback(checkpointer.close)
    start_step = 0
    try:
        restored = checkpointer.restore_latest(state)
    except ckpt_lib.StateMismatchError as err:
        host = checkpointer.host_state(checkpointer.latest_step())
        raise _cannot_resume(str(err), _changed_settings(host, config)) from None
    if restored is not None:
        state, host = restored
        changed = _changed_settings(host, config)
        start_step = int(host["step"])
        stats = PromptStats.from_state_dict(host["prompt_stats"])
        policy.load_state_dict(host["allocation_policy"])
        try:
            iterator.restore(host["iterator"])
        except ValueError as err:  # the checkpoint's data order is over other prompts
            reason = f"the checkpoint's data iterator does not fit this run's training data ({err})"
            raise _cannot_resume(reason, [c for c in changed if c.startswith("data.")]) from None
        log(f"resumed from {checkpointer.directory} at step {start_step}")
        if changed:
            log(
                "resuming with settings that differ from the checkpoint's (the run goes on "
                "with the new ones):\n  " + "\n  ".join(changed)
            )

    key = jax.random.key(config.seed)
    eval_seed_key = key if config.eval.seed < 0 else jax.random.key(config.eval.seed)
    eval_key = jax.random.fold_in(eval_seed_key, 2**31 - 1)
    eval_dir = os.path.join(workdir, "eval")
    summary: dict[str, Any] = dict(sft_summary)
    summary_path = os.path.join(workdir, "summary.json")
    if start_step == 0:
        before = heldout_metrics(config, eval_sampler, state.params, task, eval_key, eval_dir, 0)
        if before:
            log(f"held-out accuracy before RL: {before['eval_accuracy']:.3f}")
    else:
        before = host.get("heldout_before") or {}
        if os.path.exists(summary_path):
            summary.update(json.load(open(summary_path)))
            if start_step >= config.train.num_steps:
                log(
                    f"the run already finished its {config.train.num_steps} steps (summary.json): "
                    "nothing to do; raise train.num_steps to train on"
                )
                summary["final_state"] = state
                return summary
    summary["heldout_accuracy_before"] = before.get("eval_accuracy")
    if before:
        summary["heldout_before"] = before

    writer = MetricsWriter(
        workdir, config.train.num_steps, start_step, progress=progress, enabled=is_main
    )
    after = None  # held-out metrics of the final parameters, if the loop already has them
    saving_compilations = 0
    try:
        for step in range(start_step, config.train.num_steps):
            with explain_out_of_memory(config, f"RL step {step}"):
                state, metrics, hist = _rl_step(
                    config,
                    step,
                    key,
                    state,
                    step_fn,
                    sampler,
                    task,
                    stats,
                    policy,
                    iterator,
                    index_of,
                )
            if config.eval.every and (step + 1) % config.eval.every == 0:
                held = heldout_metrics(
                    config, eval_sampler, state.params, task, eval_key, eval_dir, step + 1
                )
                metrics.update(held)
                if step + 1 == config.train.num_steps:
                    after = held
            # Orbax compiles small slicing programs when it first saves arrays spread over
            # several devices; those are not the step's, and are left out.
            metrics["compilations"] = compilation.total_compilations() - saving_compilations
            if (step + 1) % config.log_every == 0 or step + 1 == config.train.num_steps:
                writer.write(step, metrics, histograms=hist)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.train.num_steps:
                writer.sync()  # the logged steps are on disk before the checkpoint that skips them
                with compilation.CompileCounter() as saving:
                    checkpointer.save(
                        step + 1,
                        state,
                        _host_state(stats, policy, iterator, step + 1, config, before),
                    )
                saving_compilations += saving.count
    finally:
        writer.close()

    if after is None:
        after = heldout_metrics(
            config, eval_sampler, state.params, task, eval_key, eval_dir, config.train.num_steps
        )
    summary["heldout_accuracy_after"] = after.get("eval_accuracy")
    if after:
        summary["heldout_after"] = after
        log(f"held-out accuracy after RL:  {after['eval_accuracy']:.3f}")
    summary["steps"] = config.train.num_steps
    if is_main:
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
        stats_path = os.path.join(workdir, "prompt_stats.csv")
        with open(stats_path, "w") as f:
            f.write(stats.to_table(**policy.weight_kwargs()))  # the run's weights
    summary["final_state"] = state
    return summary


def _rl_step(config, step, key, state, step_fn, sampler, task, stats, policy, iterator, index_of):
    t0 = time.perf_counter()
    records = next(iterator)
    ids = [r["id"] for r in records]
    n = policy.allocate(stats, ids, epoch=iterator.epoch)
    prompts = [task.encode_prompt(r["prompt"]) for r in records]
    step_key = jax.random.fold_in(key, step)
    t1 = time.perf_counter()
    out = generate_in_chunks(
        sampler,
        state.params,
        prompts,
        np.array([index_of[i] for i in ids]),
        n,
        jax.random.fold_in(step_key, 0),
        config.sampling.max_rows_per_call,
        task.tokenizer.pad_id,
        temperature=config.sampling.temperature,
        top_p=config.sampling.top_p,
        top_k=config.sampling.top_k,
    )
    t2 = time.perf_counter()
    valid = out.valid
    gid = out.group_id
    correct, rewards = score_rollouts(task, config, records, out)
    # Verifiers that report details (the math verifier: parse errors, time-outs, worker
    # restarts) have them logged with the step; a failed answer never stops the step.
    last = getattr(task.verify, "last", None)
    verify_metrics = last.metrics() if hasattr(last, "metrics") else {}
    per_group = np.bincount(gid[valid], weights=correct[valid], minlength=len(records))
    stats.update(ids, n, per_group, decay=config.allocation.stats_decay)
    t3 = time.perf_counter()

    batch = rollout_batch(out, rewards, task.tokenizer.pad_id)
    if config.train.num_minibatches > 1:
        # Several optimiser updates per step: the later ones need the behaviour log-probs of
        # the parameters before the first. With one update the step takes them from its own
        # forward pass (TrainStep.update), exactly, and this forward is skipped.
        batch["old_logp"] = step_fn.logprobs(state.params, batch).logp
    if state.ref_params is not None:
        batch["ref_logp"] = step_fn.logprobs(state.ref_params, batch).logp
    jax.block_until_ready([batch.get("old_logp"), batch.get("ref_logp")])
    t4 = time.perf_counter()
    state, m = step_fn.update(state, batch, jax.random.fold_in(step_key, 1))
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    t5 = time.perf_counter()

    lengths = out.response_lengths[valid]
    metrics = {
        "reward": float(rewards[valid].mean()),
        "accuracy": float(correct[valid].mean()),
        "alloc_min": int(n.min()),
        "alloc_mean": float(n.mean()),
        "alloc_max": int(n.max()),
        "response_length_mean": float(lengths.mean()),
        "response_length_max": int(lengths.max()),
        "truncation_rate": float(np.mean(out.finish_reason[valid] == FINISH_LENGTH)),
        "time_data_s": t1 - t0,
        "time_sampling_s": t2 - t1,
        "time_verify_s": t3 - t2,
        "time_logprobs_s": t4 - t3,
        "time_update_s": t5 - t4,
        "tokens_per_s": float(out.response_mask.sum() / max(t5 - t0, 1e-9)),
        **verify_metrics,
        **m,
    }
    return state, metrics, {"allocation": n}
