"""Device mesh, logical-axis rules and multi-host helpers.

One mesh with three axes, always in this order:

    data    pure data parallelism (parameters replicated, batch split)
    fsdp    batch split *and* parameters split along their "embed" dimension (ZeRO-3 style)
    tensor  Megatron-style split of heads / MLP hidden / vocab

Parameters carry *logical* axis names (see ``dynamo_jax.models``); ``rules`` map each logical name
to zero, one or several mesh axes. Swapping the rules (not the model) changes the parallelism.

Logical names used by the models:

    batch      rows of a batch                  -> ("data", "fsdp")
    length     sequence positions               -> None
    layers     stacked-layer axis               -> None
    vocab      vocabulary                       -> "tensor"
    embed      model width (parameters only)    -> "fsdp"
    act_embed  model width of activations       -> None
    mlp        MLP hidden width                 -> "tensor"
    heads      query heads                      -> "tensor"
    kv_heads   key/value heads                  -> "tensor"
    head_dim   per-head width                   -> None
    norm       RMSNorm scales                   -> None
    cache_len  KV-cache slots                   -> None

A mesh axis that does not divide the dimension it would split is dropped for that array (the
dimension is then replicated over it) rather than raising: e.g. 2 KV heads on a tensor axis of
4 are replicated. This keeps small models (and GQA with few KV heads) loadable on any mesh.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

DEFAULT_RULES: Rules = MappingProxyType(
    {
        "batch": BATCH_AXES,
        "length": None,
        "layers": None,
        "vocab": "tensor",
        "embed": "fsdp",
        "act_embed": None,
        "mlp": "tensor",
        "heads": "tensor",
        "kv_heads": "tensor",
        "head_dim": None,
        "norm": None,
        "cache_len": None,
    }
)

_log = logging.getLogger(__name__)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a ("data", "fsdp", "tensor") mesh with Auto axis types.

    At most one of the sizes may be -1; it takes whatever is left of ``len(devices)``.
    Auto axis types (not jax.make_mesh's Explicit default) so that jit propagates shardings and
    ``with_sharding_constraint`` works.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}"
        )
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
            f"have {len(devices)}"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Rules | None = None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    Each mesh axis is used at most once per array (first dimension wins). With ``shape`` and
    ``mesh`` given, mesh axes that do not evenly divide their dimension are dropped.
    """
    rules = DEFAULT_RULES if rules is None else rules
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule (rules: {list(rules)})")
        target = rules[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept: list[str] = []
        for axis in axes:
            if axis in used:
                continue
            if shape is not None and mesh is not None:
                size = int(np.prod([mesh.shape[a] for a in kept])) * mesh.shape[axis]
                if shape[dim] % size:
                    continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def logical_to_sharding(
    logical_axes: Sequence[str | None],
    mesh: Mesh,
    rules: Rules | None = None,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    """NamedSharding for an array with the given logical axes (see ``logical_to_spec``)."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, shape, mesh))


def variable_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names an nnx Variable was annotated with (``out_sharding``), if any."""
    names = variable.get_metadata().get("out_sharding")
    return None if names is None else tuple(names)


def state_shardings(tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedSharding pytree for an nnx Module or State (e.g. ``nnx.state(model)``).

    Returns a State of the same structure whose Variables hold NamedShardings, usable as
    ``out_shardings`` / ``in_shardings`` of ``jax.jit`` or with ``jax.device_put``. Variables
    without logical names are replicated.
    """
    state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree

    def to_sharding(v: Any) -> Any:
        if not isinstance(v, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        names = variable_logical_axes(v)
        value = v.get_value()
        if names is None:
            return v.replace(NamedSharding(mesh, PartitionSpec()))
        return v.replace(logical_to_sharding(names, mesh, rules, value.shape))

    return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def spec_axes(entry: Any) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, an axis name, or a tuple of them)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def replicated_dimensions(tree: Any, mesh: Mesh, rules: Rules | None = None) -> list[str]:
    """The parameter dimensions that `state_shardings` leaves whole although the rules split
    them, because their mesh axis does not divide them: ``"path: dim 0 (18) not over tensor
    (8)"``, one line per dimension. Each such array is held whole on every device of that axis,
    which costs memory a user may not expect (e.g. 2 KV heads on a tensor axis of 4)."""
    rules = DEFAULT_RULES if rules is None else rules
    state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree
    found: list[str] = []
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    for path, v in leaves:
        names = variable_logical_axes(v) if isinstance(v, nnx.Variable) else None
        if names is None:
            continue
        shape = v.get_value().shape
        wanted = logical_to_spec(names, rules)
        got = logical_to_spec(names, rules, shape, mesh)
        for dim, (w, g) in enumerate(zip(wanted, got, strict=True)):
            dropped = [a for a in spec_axes(w) if a not in spec_axes(g) and mesh.shape[a] > 1]
            if dropped:
                where = "/".join(str(getattr(k, "key", k)) for k in path)
                sizes = " x ".join(f"{a} ({mesh.shape[a]})" for a in dropped)
                found.append(f"{where}: dim {dim} ({shape[dim]}) not over {sizes}")
    return found


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> nnx.Module:
    """Moves a model's state onto ``mesh`` following its logical axes (in place, returned)."""
    state = nnx.state(model)
    sharded = jax.device_put(state, state_shardings(state, mesh, rules))
    nnx.update(model, sharded)
    if hasattr(model, "set_mesh"):
        model.set_mesh(mesh, rules)
    return model


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding for [rows, ...] arrays: rows split over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def with_logical_constraint(
    x: jax.Array,
    logical_axes: Sequence[str | None],
    mesh: Mesh | None,
    rules: Rules | None = None,
) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op when ``mesh`` is None."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(
        x, logical_to_sharding(logical_axes, mesh, rules, x.shape)
    )


def _cluster_env_detected() -> bool:
    """True when the environment looks like a multi-process launch jax can auto-detect."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Thin wrapper on ``jax.distributed.initialize``; a no-op for a single process.

    With no arguments it initialises only when the environment looks like a multi-process
    launch (TPU pod, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS), letting jax auto-detect the
    rest. Must run before any other jax call that touches devices. Returns True if
    jax.distributed is initialised afterwards.
    """
    if jax.distributed.is_initialized():
        return True
    if num_processes == 1:
        return False
    if coordinator_address is None and num_processes is None and process_id is None:
        if not _cluster_env_detected():
            return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    _log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
