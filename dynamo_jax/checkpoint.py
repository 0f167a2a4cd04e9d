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

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Iterator
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


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """An event loop that, when closed, first cancels and awaits the tasks still pending on it
    and waits for its executor's threads (what `asyncio.run` does before closing its loop)."""

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.run_until_complete(self.shutdown_default_executor())
        super().close()


# Event-loop policies are deprecated from Python 3.14 (removed in 3.16): there the context
# below does nothing, and a failed Orbax restore may again warn later.
DRAINS_ORBAX_LOOPS = sys.version_info < (3, 14)

if DRAINS_ORBAX_LOOPS:

    class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return _DrainingEventLoop()


_policy_lock = threading.Lock()
_policy_depth = 0
_policy_saved: asyncio.AbstractEventLoopPolicy | None = None


@contextlib.contextmanager
def orbax_loops_drained() -> Iterator[None]:
    """Orbax reads in parallel tasks on an event loop of its own, and when one read fails (an
    array of another shape) it closes that loop with the other reads still pending: their
    TensorStore callbacks then hit the closed loop ("Event loop is closed") and their coroutines
    are dropped unawaited, both reported later, in unrelated code. Within this context the loops
    Orbax makes cancel and await their pending tasks before they close, so a failed restore
    leaves nothing behind (a successful one has no pending task: nothing changes for it)."""
    global _policy_depth, _policy_saved
    if not DRAINS_ORBAX_LOOPS:
        yield
        return
    with _policy_lock:
        if _policy_depth == 0:
            _policy_saved = asyncio.get_event_loop_policy()
            asyncio.set_event_loop_policy(_DrainingPolicy())
        _policy_depth += 1
    try:
        yield
    finally:
        with _policy_lock:
            _policy_depth -= 1
            if _policy_depth == 0:
                asyncio.set_event_loop_policy(_policy_saved)
                _policy_saved = None


class StateMismatchError(ValueError):
    """A checkpoint whose train state has other arrays (shapes, dtypes) than the run's."""


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

    def host_state(self, step: int) -> dict[str, Any]:
        """The JSON host state saved at `step` alone (no arrays are read)."""
        out = self._manager.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))
        return from_jsonable(out["host"])

    def saved_arrays(self, step: int) -> list[tuple[tuple[int, ...], str]] | None:
        """Sorted (shape, dtype) of the arrays of the train state saved at `step`, from the
        checkpoint's metadata (None when it cannot be read)."""
        tree = state_metadata(self.directory, step)
        if tree is None:
            return None
        leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))
        return sorted((tuple(x.shape), str(np.dtype(x.dtype))) for x in leaves)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore into the shapes, dtypes and shardings of `abstract_state` (a pytree of arrays
        or jax.ShapeDtypeStruct with sharding). Raises `StateMismatchError` (before reading any
        array) when the saved train state has other arrays than `abstract_state`."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
        )
        saved = self.saved_arrays(step)
        wanted = sorted((tuple(x.shape), str(np.dtype(x.dtype))) for x in jax.tree.leaves(target))
        if saved is not None and saved != wanted:
            only_saved = sorted(set(saved) - set(wanted))[:3]
            only_wanted = sorted(set(wanted) - set(saved))[:3]
            raise StateMismatchError(
                f"the checkpoint {self.directory}/{step} holds {len(saved)} arrays, this run's "
                f"train state {len(wanted)}; saved only: {only_saved}; expected only: "
                f"{only_wanted}"
            )
        with orbax_loops_drained():
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


def state_metadata(directory: str | os.PathLike, step: int) -> Any | None:
    """The metadata tree (shapes and dtypes, no array read) of the train state a
    `RunCheckpointer` saved at `step` under `directory`, or None when it cannot be read (an
    unreadable or older layout: the restore itself then decides). The one reader of checkpoint
    metadata: the trainer's resume check and `experiments/eval.py`'s parameter check use it."""
    import logging

    path = os.path.join(os.fspath(directory), str(step), "state")
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # "Metadata file does not exist" is harmless here
    try:
        # Closed at once, so that its threads and event loop do not outlive the call.
        with orbax_loops_drained(), ocp.StandardCheckpointer() as checkpointer:
            meta = checkpointer.metadata(path)
    except Exception:
        return None
    finally:
        absl_logger.setLevel(level)
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)
