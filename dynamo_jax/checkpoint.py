"""Checkpoints of a run: train state + PromptStats + data position + RNG + config (SPEC 5.9).

Orbax writes the device state (parameters, optimizer state, step; sharded arrays are written
and restored per shard, so this works on multi-host meshes) next to one JSON document with the
host state (PromptStats, allocation-policy snapshot, data iterator position, RNG seed and step,
the config). A run started again with the same work dir restores the latest checkpoint.

    manager = RunCheckpointer(workdir / "checkpoints", keep=3)
    manager.save(step, state, host_state)          # host_state: JSON-able dict
    state, host_state = manager.restore_latest(abstract_state)   # or None if there is none
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def to_jsonable(tree: Any) -> Any:
    """numpy arrays / scalars -> lists / Python numbers, recursively (exact for float64)."""
    if isinstance(tree, dict):
        return {str(k): to_jsonable(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [to_jsonable(v) for v in tree]
    if isinstance(tree, np.ndarray):
        return {"__ndarray__": tree.tolist(), "dtype": str(tree.dtype)}
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def from_jsonable(tree: Any) -> Any:
    if isinstance(tree, dict):
        if "__ndarray__" in tree:
            return np.asarray(tree["__ndarray__"], dtype=tree["dtype"])
        return {k: from_jsonable(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [from_jsonable(v) for v in tree]
    return tree


class RunCheckpointer:
    """Keeps the last `keep` checkpoints of a run under `directory`."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "host")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, host_state: dict[str, Any]) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                host=ocp.args.JsonSave(to_jsonable(host_state)),
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore into the shapes, dtypes and shardings of `abstract_state` (a pytree of arrays
        or jax.ShapeDtypeStruct with sharding)."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
        )
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), host=ocp.args.JsonRestore()
            ),
        )
        return out["state"], from_jsonable(out["host"])

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(step, abstract_state)

    def close(self) -> None:
        self._manager.close()
