"""Evaluate a policy on math benchmarks: Pass@1 (mean over samples), pass@k and maj@k per benchmark.

    python -m experiments.eval --config configs/qwen2_5_math_1_5b_dynamo.py --workdir runs/1_5b \\
        --config.model.path=/models/Qwen2.5-Math-1.5B \\
        --config.eval.benchmarks=AIME24=/data/aime24.jsonl,MATH500=/data/math500.jsonl

What is evaluated: the latest checkpoint under WORKDIR/checkpoints (only its parameters are read),
or the one of --checkpoint_step=N; --checkpoint_step=0, or a work dir without checkpoints, takes
the weights in model.path (the base model). The model's shape comes from model.path/config.json
(else model.architecture), the tokenizer from tokenizer.path (else model.path).

Benchmarks: config.eval.benchmarks, comma-separated name=path.jsonl (or .parquet), each row with
the data.prompt_field / data.answer_field columns (default "problem" / "answer"; an id column is
optional); a file with other columns names them in its entry:
AMC23=/data/amc23.jsonl?prompt=question&answer=answer. Prompts use the Qwen2.5-Math chat
template, as in training. Each problem gets k = eval.samples_per_prompt samples (1 with
eval.greedy) at sampling.temperature / top_p / top_k for up to sampling.max_new_tokens tokens;
pass@k and maj@k are reported for k = eval.pass_k (capped at the number of samples, with a
note; in maj@k, numbers written in different forms, 1/2, 0.5 and a LaTeX fraction, vote together).
Results: WORKDIR/eval_results.md and .json (the table, the average over benchmarks, per-problem
counts, settings), also printed.

A checkpoint whose parameters do not fit the model the config describes (another shape, more
layers...) is refused with the parameters and the config fields that differ from the run's.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a Python file with get_config()).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run directory: checkpoints are read from WORKDIR/checkpoints and "
    "eval_results.md / eval_results.json are written here.",
)
_STEP = flags.DEFINE_integer(
    "checkpoint_step",
    -1,
    "Checkpoint to evaluate: -1 = the latest (model.path weights when there is none), "
    "0 = the model.path weights, N = the checkpoint saved after RL step N.",
)
_MAX_PROBLEMS = flags.DEFINE_integer(
    "max_problems", 0, "Evaluate only the first N problems of each benchmark (0 = all)."
)
_MAX_ROWS = flags.DEFINE_integer(
    "max_rows_per_call",
    512,
    "Rows (problems x samples) sampled per call: bounds the KV cache, "
    "rows x layers x 2 x kv_heads x (prompt + max_new_tokens) x head_dim x 2 bytes.",
)
_OUTPUT = flags.DEFINE_string("output_name", "eval_results", "Stem of the result files.")
flags.mark_flags_as_required(["config", "workdir"])


def _model_config(config: Any, tokenizer: Any):
    from dynamo_jax.models import ModelConfig

    if config.model.path:
        return ModelConfig.from_hf_dir(config.model.path)
    arch = config.model.architecture.to_dict()
    arch.setdefault("vocab_size", int(tokenizer.vocab_size))
    return ModelConfig.from_hf_dict(arch)


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps saved under WORKDIR/checkpoints (empty when there are none)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


_SHAPE_MISMATCH = "is not compatible with the stored shape"  # Orbax's ValueError on a shape


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`layers/wq -> shape` for a serialized parameter tree or its checkpoint metadata."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    flat = {}
    for path, leaf in leaves:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        flat["/".join(n for n in names if n != "value")] = tuple(leaf.shape)
    return flat


def param_differences(saved: Any, wanted: Any) -> list[str]:
    """What differs between the parameters in a checkpoint and those the config's model has
    (both serialized trees or metadata), one line per parameter: missing ones first, then
    other shapes, each sorted by name."""
    saved, wanted = _flat_shapes(saved), _flat_shapes(wanted)
    names = sorted(set(saved) | set(wanted))
    missing = [
        f"{n}: in the checkpoint {saved[n]}, not in the config's model"
        for n in names
        if n not in wanted
    ]
    missing += [
        f"{n}: in the config's model {wanted[n]}, not in the checkpoint"
        for n in names
        if n not in saved
    ]
    shapes = [
        f"{n}: checkpoint {saved[n]}, config {wanted[n]}"
        for n in names
        if n in saved and n in wanted and saved[n] != wanted[n]
    ]
    return missing + shapes


# The config fields that decide the parameters' shapes (the vocabulary comes from the tokenizer).
_SHAPE_FIELDS = ("model.architecture.", "model.path:", "tokenizer.path:")


def mismatch_error(
    directory: str, step: int, differences: list[str], saved_config: str | None, config: Any
) -> Exception:
    """The error for a checkpoint whose parameters do not fit the model `config` describes:
    the parameters that differ and the shape-deciding config fields that differ from the run's."""
    from dynamo_jax import config as config_lib

    shown = differences[:6] + ([f"... {len(differences) - 6} more"] if len(differences) > 6 else [])
    msg = (
        f"The checkpoint of step {step} in {directory} does not match the config: its parameters "
        "are not those of the model the config describes:\n  " + "\n  ".join(shown)
    )
    if saved_config is not None and config is not None:
        from dynamo_jax.trainer import config_changes

        changed = [c for c in config_changes(saved_config, config) if c.startswith(_SHAPE_FIELDS)]
        if changed:
            msg += "\nConfig fields that differ from the run's (run -> now):\n  " + "\n  ".join(
                changed
            )
    return config_lib.ConfigError(
        msg + "\nEvaluate with the config the run was trained with: the same --config file and "
        "the same --config.model.* / --config.tokenizer.* overrides (or --checkpoint_step=0 for "
        "the weights in model.path)."
    )


def restore_params(
    directory: str, step: int, abstract_params: Any, mesh: Any, config: Any = None
) -> Any:
    """Only the parameters of a RunCheckpointer checkpoint (no optimizer state is read), placed
    with the shardings of `abstract_params` on `mesh`. A checkpoint whose parameters differ in
    names or shapes from `abstract_params` raises ConfigError naming them (and the config fields
    that differ from the run's, read from the checkpoint's host state, when `config` is given).
    `directory` may be relative (Orbax itself refuses one with a traceback)."""
    import jax
    import orbax.checkpoint as ocp

    from dynamo_jax import checkpoint as ckpt_lib
    from dynamo_jax import sharding as shd

    directory = os.path.abspath(directory)
    shardings = shd.state_shardings(abstract_params, mesh)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params, shardings
    )
    item = {"params": ocp.tree.serialize_tree(target)}
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), item)
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "host": ocp.JsonCheckpointHandler()},
    )

    def mismatch(differences: list[str]) -> Exception:
        host = manager.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))
        saved_config = (host["host"] or {}).get("config")
        return mismatch_error(directory, step, differences, saved_config, config)

    try:
        # Checked before reading: a failed Orbax read prints pages of tracebacks from its threads.
        saved = ckpt_lib.state_metadata(directory, step)
        differences = [] if saved is None else param_differences(saved["params"], item["params"])
        if differences:
            raise mismatch(differences)
        try:
            with ckpt_lib.orbax_loops_drained():
                out = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.PyTreeRestore(
                            item=item, restore_args=restore_args, partial_restore=True
                        )
                    ),
                )
        except ValueError as err:
            if _SHAPE_MISMATCH not in str(err):
                raise
            raise mismatch([str(err).split(". ")[0]]) from err
    finally:
        manager.close()
    return ocp.tree.deserialize_tree(out["state"]["params"], target)


def load_policy(config: Any, workdir: str, step: int, mesh: Any, tokenizer: Any, log):
    """(model, params, step evaluated or 0 for model.path, description)."""
    import jax.numpy as jnp
    from flax import nnx

    from dynamo_jax import models
    from dynamo_jax import train_step as ts

    dtype = getattr(jnp, config.model.dtype)
    param_dtype = getattr(jnp, config.model.param_dtype)
    steps = checkpoint_steps(workdir)
    if step == -1:
        step = steps[-1] if steps else 0
    if step == 0:
        if not config.model.path:
            raise app.UsageError(
                f"No checkpoint under {workdir}/checkpoints and model.path is empty: pass "
                "--config.model.path=/path/to/model or a work dir of a run"
            )
        log(f"evaluating the weights in model.path = {config.model.path}")
        model = models.load_pretrained(
            config.model.path, dtype=dtype, param_dtype=param_dtype, mesh=mesh
        )
        return model, nnx.state(model, nnx.Param), 0, f"model.path {config.model.path}"
    if step not in steps:
        raise app.UsageError(
            f"--checkpoint_step={step}: no such checkpoint under {workdir}/checkpoints "
            f"(saved steps: {steps or 'none'})"
        )
    model_cfg = _model_config(config, tokenizer)
    abstract = nnx.eval_shape(
        lambda: models.Transformer(
            model_cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype
        )
    )
    abstract.set_mesh(mesh)
    graphdef, abstract_params, rest = ts.split_model(abstract)
    directory = os.path.join(workdir, "checkpoints")
    log(f"restoring the parameters of step {step} from {directory}")
    params = restore_params(directory, step, abstract_params, mesh, config)
    model = nnx.merge(graphdef, params, rest)
    return model, params, step, f"checkpoint step {step} ({directory})"


def check_options(
    *, checkpoint_step: int, max_problems: int, max_rows_per_call: int, output_name: str
) -> None:
    """Raise ConfigError naming each command-line option (run() argument) out of its range."""
    from dynamo_jax import config as config_lib

    errors = []
    if checkpoint_step < -1:
        errors.append(
            f"--checkpoint_step={checkpoint_step}: must be -1 (the latest checkpoint), 0 (the "
            "weights in model.path) or N >= 1 (the checkpoint of RL step N)"
        )
    if max_problems < 0:
        errors.append(
            f"--max_problems={max_problems}: must be >= 0 (N = the first N problems of each "
            "benchmark, 0 = all)"
        )
    if max_rows_per_call < 1:
        errors.append(
            f"--max_rows_per_call={max_rows_per_call}: must be >= 1 (rows sampled per call, "
            "default 512)"
        )
    if not output_name or os.sep in output_name or output_name in (".", ".."):
        errors.append(
            f"--output_name={output_name!r}: must be a file name stem, e.g. eval_results "
            "(the files are written to the work dir)"
        )
    if errors:
        raise config_lib.ConfigError("Invalid options:\n  - " + "\n  - ".join(errors))


def run(
    config: Any,
    workdir: str,
    *,
    checkpoint_step: int = -1,
    max_problems: int = 0,
    max_rows_per_call: int = 512,
    output_name: str = "eval_results",
    log=print,
    verifier_workers: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """Evaluates and writes WORKDIR/{output_name}.md/.json; returns (markdown, data)."""
    import jax

    from dynamo_jax import buckets as bk
    from dynamo_jax import config as config_lib
    from dynamo_jax import evaluation, math_task
    from dynamo_jax import sharding as shd
    from dynamo_jax.sampling import Sampler

    check_options(
        checkpoint_step=checkpoint_step,
        max_problems=max_problems,
        max_rows_per_call=max_rows_per_call,
        output_name=output_name,
    )
    config_lib.validate(config)
    if config.eval.pass_k < 1:
        raise config_lib.ConfigError(
            f"eval.pass_k = {config.eval.pass_k} must be >= 1: pass --config.eval.pass_k=K for "
            "pass@K and maj@K (K <= eval.samples_per_prompt)"
        )
    if not config.eval.benchmarks:
        raise config_lib.ConfigError(
            "eval.benchmarks is empty: pass --config.eval.benchmarks=AIME24=/data/aime24.jsonl,"
            "MATH500=/data/math500.jsonl (comma-separated name=path.jsonl)"
        )
    workdir = os.path.abspath(workdir)
    if config.distributed.coordinator_address:
        shd.initialize_distributed(
            config.distributed.coordinator_address,
            config.distributed.num_processes,
            config.distributed.process_id,
        )
    math_task.require_math_paths(config, need_train=False)
    benchmarks = math_task.load_benchmarks(config)
    tokenizer = math_task.load_math_tokenizer(config)
    mesh = shd.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor)
    model, params, step, source = load_policy(
        config, workdir, checkpoint_step, mesh, tokenizer, log
    )
    spec = bk.BucketSpec(
        prompt_len_buckets=tuple(config.buckets.prompt_len),
        row_buckets=64,
        prompt_count_buckets=8,
        max_new_tokens=config.sampling.max_new_tokens,
    )
    sampler = Sampler(
        model,
        eos_ids=tokenizer.eos_ids,
        pad_id=tokenizer.pad_id,
        spec=spec,
        vocab_limit=int(tokenizer.vocab_size),  # ids past the tokenizer's: never sampled
    )
    k = 1 if config.eval.greedy else config.eval.samples_per_prompt
    pass_k = min(config.eval.pass_k, k)
    if pass_k < config.eval.pass_k:
        why = "eval.greedy takes 1" if config.eval.greedy else "eval.samples_per_prompt"
        log(
            f"note: eval.pass_k = {config.eval.pass_k} > {k} samples per problem ({why}): "
            f"reporting pass@{k} and maj@{k}; for pass@{config.eval.pass_k} pass "
            f"--config.eval.samples_per_prompt={config.eval.pass_k}"
            + (" --config.eval.greedy=False" if config.eval.greedy else "")
        )
    if max_rows_per_call < k:
        log(
            f"note: --max_rows_per_call={max_rows_per_call} < {k} samples per problem: each call "
            f"samples one problem ({k} rows)"
        )
    verify = math_task.MathVerify(verifier_workers)
    t0 = time.perf_counter()
    try:
        markdown, data = evaluation.evaluate_benchmarks(
            sampler,
            params,
            tokenizer,
            benchmarks,
            k,
            config.sampling.temperature,
            verify.details,
            jax.random.key(config.seed),
            pass_k=pass_k,
            top_p=config.sampling.top_p,
            top_k=config.sampling.top_k,
            greedy=config.eval.greedy,
            max_problems=max_problems or None,
            max_rows_per_call=max_rows_per_call,
            out_dir=workdir if jax.process_index() == 0 else None,
            file_stem=output_name,
            settings={
                "checkpoint_step": step,
                "policy": source,
                "max_new_tokens": config.sampling.max_new_tokens,
                "seed": config.seed,
            },
            log=log,
        )
    finally:
        verify.close()
    log(f"evaluated in {time.perf_counter() - t0:.1f} s; wrote {workdir}/{output_name}.md/.json")
    return markdown, data


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from dynamo_jax import config as config_lib

    try:
        markdown, _ = run(
            _CONFIG.value,
            _WORKDIR.value,
            checkpoint_step=_STEP.value,
            max_problems=_MAX_PROBLEMS.value,
            max_rows_per_call=_MAX_ROWS.value,
            output_name=_OUTPUT.value,
        )
    except config_lib.ConfigError as err:
        sys.exit(str(err))
    print(markdown)


if __name__ == "__main__":
    from dynamo_jax import config as config_lib

    config_lib.exit_on_bad_command_line(sys.argv)
    app.run(main)
