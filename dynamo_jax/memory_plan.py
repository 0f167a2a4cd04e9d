"""Per-device memory of a run, before it runs: will this config fit the accelerators?

The model is built abstractly (``nnx.eval_shape``: no weights are allocated), the train-step
update is lowered and compiled for the config's mesh, and XLA's ``memory_analysis()`` of that
program gives the update's arguments (parameters, AdamW moments, a reference model, the batch)
and temporaries (activations kept for the backward pass, logit chunks, gradients). The sampler's
KV cache and its compute-dtype copy of the weights are computed from the shapes. Works for any
device kind, including simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), so a pod's plan can be checked on a
laptop; ``python -m experiments.plan_memory --help``.

    plan = plan_memory(config)           # jax.devices(), or devices=[...]
    print(plan.table())
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from dynamo_jax import buckets as bk
from dynamo_jax import sharding as shd
from dynamo_jax import train_step as ts
from dynamo_jax.models import ModelConfig, Transformer
from dynamo_jax.models.transformer import CACHE_LOGICAL_AXES

GiB = 2**30
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_config(config: Any) -> ModelConfig:
    """The architecture a run of `config` builds: `model.path`'s config.json when set, else
    `model.architecture` (which must then name `vocab_size`: a run takes it from the tokenizer
    it builds, which a plan does not)."""
    if config.model.path:
        path = os.path.join(config.model.path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"model.path = {config.model.path!r} has no config.json: point it at a Hugging "
                "Face model folder"
            )
        with open(path) as f:
            return ModelConfig.from_hf_dict(json.load(f))
    arch = config.model.architecture.to_dict()
    if "vocab_size" not in arch:
        raise ValueError(
            "model.architecture.vocab_size is not set (a run takes it from the tokenizer it "
            "builds); set it to plan the run (experiments.plan_memory: --vocab_size N)"
        )
    return ModelConfig.from_hf_dict(arch)


def compile_update(
    config: Any,
    rows: int,
    prompt_len: int,
    response_len: int,
    devices: Sequence[jax.Device] | None = None,
    micro_batch_rows: int | None = None,
    num_minibatches: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Lowers + compiles `TrainStep`'s update for the config's model and mesh without
    allocating parameters: one step's `rows` rows of `prompt_len + response_len` tokens, split
    into `num_minibatches` optimiser updates (default: one per micro-batch) of micro-batches of
    `micro_batch_rows` rows (default: one row per device).

    Returns (compiled, info) with info: mesh shape, parameter count, seconds to compile."""
    devices = list(jax.devices() if devices is None else devices)
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    model_cfg = model_config(config)
    t0 = time.perf_counter()
    abstract = nnx.eval_shape(
        lambda: Transformer(
            model_cfg,
            rngs=nnx.Rngs(0),
            dtype=_DTYPES[config.model.dtype],
            param_dtype=_DTYPES[config.model.param_dtype],
            remat=config.model.remat,
        )
    )
    abstract.set_mesh(mesh)  # activation sharding constraints, as load_pretrained(mesh=...) does
    graphdef, params, rest = ts.split_model(abstract)
    shardings = shd.state_shardings(params, mesh)

    def struct(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    params = jax.tree.map(struct, params, shardings)
    scalar = shd.replicated(mesh)
    tx = ts.make_optimizer(config)
    opt_state = optax.tree_utils.tree_map_params(
        tx,
        struct,
        jax.eval_shape(tx.init, params),
        shardings,
        transform_non_params=lambda x: struct(x, scalar),
    )
    state = ts.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar),
        params=params,
        opt_state=opt_state,
        ref_params=jax.tree.map(lambda x: x, params) if config.loss.kl_coef > 0 else None,
    )
    micro = len(devices) if micro_batch_rows is None else micro_batch_rows
    minibatches = rows // micro if num_minibatches is None else num_minibatches
    if rows % (micro * minibatches):
        raise ValueError(
            f"rows = {rows} do not split into {minibatches} minibatches of micro-batches of "
            f"{micro} rows"
        )
    step_config = config.copy_and_resolve_references()
    step_config.train.micro_batch_rows = micro
    step_config.train.num_minibatches = minibatches
    settings = ts.StepSettings.from_config(step_config, num_groups=max(rows // 16, 1))
    step = ts.TrainStep(
        graphdef, rest, tx, settings, ts.state_shardings(state), shd.batch_sharding(mesh)
    )
    total = prompt_len + response_len

    def arr(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype)

    batch = {
        "input_ids": arr((rows, total), jnp.int32),
        "positions": arr((rows, total), jnp.int32),
        "attention_mask": arr((rows, total), jnp.bool_),
        "targets": arr((rows, response_len), jnp.int32),
        "response_mask": arr((rows, response_len), jnp.float32),
        "old_logp": arr((rows, response_len), jnp.float32),
        "rewards": arr((rows,), jnp.float32),
        "group_ids": arr((rows,), jnp.int32),
        "valid": arr((rows,), jnp.bool_),
    }
    if config.loss.kl_coef > 0:
        batch["ref_logp"] = arr((rows, response_len), jnp.float32)
    # The jitted update the trainer calls (in/out shardings pinned, state donated).
    compiled = step._update.lower(state, batch, jax.random.key(0)).compile()
    leaves = jax.tree.leaves(params)
    info = {
        "mesh": dict(mesh.shape),
        "num_params": sum(math.prod(x.shape) for x in leaves),
        # elements of the parameters that one device holds (its shards)
        "param_elements_per_device": sum(
            math.prod(x.sharding.shard_shape(x.shape)) for x in leaves
        ),
        "seconds": time.perf_counter() - t0,
    }
    return compiled, info


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device sizes in GiB. The update's peak is its arguments (state + batch, the state
    donated and updated in place) plus XLA's temporaries; sampling holds the train state, the KV
    cache of one sampler call and, when the compute dtype differs from the parameter dtype, a
    compute-dtype copy of the weights."""

    mesh: dict[str, int]
    num_params: int
    step_rows: int
    micro_batch_rows: int
    positions: int
    update_arguments_gib: float
    update_temporaries_gib: float
    state_gib: float
    sampling_rows: int
    sampling_cache_gib: float
    sampling_weights_gib: float
    compile_seconds: float

    @property
    def update_peak_gib(self) -> float:
        return self.update_arguments_gib + self.update_temporaries_gib

    @property
    def sampling_peak_gib(self) -> float:
        return self.state_gib + self.sampling_cache_gib + self.sampling_weights_gib

    @property
    def peak_gib(self) -> float:
        return max(self.update_peak_gib, self.sampling_peak_gib)

    def table(self) -> str:
        devices = math.prod(self.mesh.values())
        mesh = ", ".join(f"{k} {v}" for k, v in self.mesh.items())
        rows = [
            ("parameters + AdamW moments (+ reference model)", self.state_gib),
            (
                f"update: arguments (state + the step's {self.step_rows} rows x "
                f"{self.positions} positions)",
                self.update_arguments_gib,
            ),
            (
                f"update: XLA temporaries ({self.micro_batch_rows}-row micro-batches: "
                "activations, logit chunks, gradients)",
                self.update_temporaries_gib,
            ),
            ("update: peak", self.update_peak_gib),
            (
                f"sampling: KV cache of one call ({self.sampling_rows} rows x {self.positions} "
                f"positions)",
                self.sampling_cache_gib,
            ),
            ("sampling: the decode's weight copy (compute dtype)", self.sampling_weights_gib),
            ("sampling: peak (state + cache + weights)", self.sampling_peak_gib),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [
            f"{self.num_params / 1e9:.3f}B parameters on {devices} device"
            f"{'s' if devices != 1 else ''} (mesh {mesh}); "
            f"per device, GiB (compiled in {self.compile_seconds:.1f} s):"
        ]
        lines += [f"  {name:{width}s} {gib:9.3f}" for name, gib in rows]
        return "\n".join(lines)


def memory_advice(config: Any) -> str:
    """The config fields that bound a step's memory per device, with their values, and what to
    change first."""
    c = config
    rows = c.prompts_per_step * c.rollouts_per_prompt
    positions = max(c.buckets.prompt_len) + c.sampling.max_new_tokens
    per_call = c.sampling.max_rows_per_call or rows
    mesh = f"mesh.data={c.mesh.data}, mesh.fsdp={c.mesh.fsdp}, mesh.tensor={c.mesh.tensor}"
    return (
        f"What bounds it, with this run's values:\n"
        f"  - the update keeps every layer's activations of a micro-batch for the backward pass "
        f"unless model.remat=True (now {c.model.remat}): train.micro_batch_rows="
        f"{c.train.micro_batch_rows} rows x up to {positions} positions per micro-batch;\n"
        f"  - the log-probs hold loss.logits_chunk_size={c.loss.logits_chunk_size} positions x "
        f"the vocabulary in float32 per row at a time;\n"
        f"  - sampling holds a KV cache for sampling.max_rows_per_call="
        f"{c.sampling.max_rows_per_call} ({per_call} of the step's {rows} rollouts) x "
        f"{positions} positions;\n"
        f"  - weights and the two AdamW moments in model.param_dtype={c.model.param_dtype}, "
        f"compute in model.dtype={c.model.dtype}, split over the mesh ({mesh}).\n"
        f"Try, in this order: {'; '.join(_remedies(c))}."
    )


def _remedies(c: Any) -> list[str]:
    out = [] if c.model.remat else ["model.remat=True"]
    out += ["a smaller train.micro_batch_rows", "a smaller sampling.max_rows_per_call"]
    out += [] if c.model.dtype == "bfloat16" else ["model.dtype=bfloat16"]
    return [*out, "more devices on mesh.fsdp"]


def _bytes(dtype: str) -> int:
    return jnp.dtype(_DTYPES[dtype]).itemsize


def plan_memory(config: Any, devices: Sequence[jax.Device] | None = None) -> MemoryPlan:
    """Compiles the update of one step as the trainer calls it (prompts_per_step x
    rollouts_per_prompt rows at the longest prompt bucket + `sampling.max_new_tokens`,
    `train.num_minibatches` optimiser updates of `train.micro_batch_rows`-row micro-batches)
    for the config's mesh over `devices` (default: all) and adds the sampler's KV cache and
    weight copy. Nothing of model size is allocated."""
    devices = list(jax.devices() if devices is None else devices)
    prompt_len, response_len = max(config.buckets.prompt_len), config.sampling.max_new_tokens
    micro = config.train.micro_batch_rows
    step_rows = config.prompts_per_step * config.rollouts_per_prompt
    compiled, info = compile_update(
        config,
        step_rows,
        prompt_len,
        response_len,
        devices,
        micro_batch_rows=micro,
        num_minibatches=config.train.num_minibatches,
    )
    m = compiled.memory_analysis()
    per_device = info["param_elements_per_device"]
    copies = 3 + (1 if config.loss.kl_coef > 0 else 0)  # params, two moments, reference
    state = per_device * _bytes(config.model.param_dtype) * copies
    arch = model_config(config)
    positions = prompt_len + response_len
    rows = config.sampling.max_rows_per_call or (
        config.prompts_per_step * config.rollouts_per_prompt
    )
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    # The sampler rounds a call's rows up to a multiple of the batch shards, so they split over
    # them (unrounded, rows that do not divide would be planned as copied onto every device).
    batch_shards = math.prod(mesh.shape[a] for a in shd.BATCH_AXES)
    rows = bk.choose_multiple(rows, (rows,), batch_shards, "sampling rows")
    # One call's cache, sharded as the sampler shards it (rows over data x fsdp, kv heads over
    # tensor, where they divide): k and v, every layer.
    shape = (arch.num_layers, rows, arch.num_kv_heads, positions, arch.head_dim)
    spec = shd.logical_to_spec(CACHE_LOGICAL_AXES, None, shape, mesh)
    shard = NamedSharding(mesh, spec).shard_shape(shape)
    cache = 2 * math.prod(shard) * _bytes(config.model.dtype)
    # The decode program holds its own copy of the layer weights in the compute dtype (sliced
    # per layer for the decode loop, and cast where the dtypes differ): measured on an H100 with
    # XLA's memory analysis of the sampler's decode, 1.00x the float32 layer stack with float32
    # compute, 0.50x with bfloat16 compute (docs/SCALING.md).
    weights = per_device * _bytes(config.model.dtype)
    return MemoryPlan(
        mesh=info["mesh"],
        num_params=info["num_params"],
        step_rows=step_rows,
        micro_batch_rows=micro,
        positions=positions,
        update_arguments_gib=m.argument_size_in_bytes / GiB,
        update_temporaries_gib=m.temp_size_in_bytes / GiB,
        state_gib=state / GiB,
        sampling_rows=rows,
        sampling_cache_gib=cache / GiB,
        sampling_weights_gib=weights / GiB,
        compile_seconds=info["seconds"],
    )


def suggest_fit(
    config: Any,
    hbm_gib: float,
    devices: Sequence[jax.Device] | None = None,
    log: Any = None,
) -> tuple[dict[str, Any], MemoryPlan] | None:
    """The largest `train.micro_batch_rows` (first with the config's `model.remat`, then with
    remat on) whose plan fits `hbm_gib` per device, trying the divisors of the rows per update
    from the config's value down to the number of row shards; None if none fits (then the
    sampler's cache, the dtypes or the mesh must change). Each try compiles the update once.

    Returns ({"train.micro_batch_rows": m, "model.remat": bool}, its plan)."""
    devices = list(jax.devices() if devices is None else devices)
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    row_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    per_update = config.prompts_per_step * config.rollouts_per_prompt
    per_update //= config.train.num_minibatches
    candidates = [
        m
        for m in range(config.train.micro_batch_rows, 0, -1)
        if per_update % m == 0 and m % row_shards == 0
    ]
    for remat in dict.fromkeys([bool(config.model.remat), True]):
        for micro in candidates:
            trial = config.copy_and_resolve_references()
            trial.train.micro_batch_rows, trial.model.remat = micro, remat
            plan = plan_memory(trial, devices)
            if log is not None:
                log(f"  micro_batch_rows={micro}, remat={remat}: peak {plan.peak_gib:.2f} GiB")
            if plan.peak_gib <= hbm_gib:
                return {"train.micro_batch_rows": micro, "model.remat": remat}, plan
            if plan.sampling_peak_gib > hbm_gib:
                return None  # the update is not what does not fit
    return None
