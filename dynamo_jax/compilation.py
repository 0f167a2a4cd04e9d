"""Counting XLA compilations (a metric, and how tests prove "no recompiles").

`jax.jit(...)._cache_size()` counts call signatures of the C++ fast path, which grows when, say,
an argument switches from uncommitted to committed, without compiling anything. What costs time
is a backend compilation; JAX reports each one as a monitoring event, which we count here.

    with CompileCounter() as c:
        ...
    c.count            # backend compilations inside the block
    total_compilations()  # since the process started counting
"""

from __future__ import annotations

import collections
import threading

from jax import monitoring

_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_counts: collections.Counter[str] = collections.Counter()
_installed = False


def _listener(event: str, duration: float, **kwargs) -> None:
    if event == _EVENT:
        with _lock:
            _counts[str(kwargs.get("fun_name", "?"))] += 1


def install() -> None:
    """Start counting (idempotent). Call before the compilations you want to see."""
    global _installed
    with _lock:
        if not _installed:
            monitoring.register_event_duration_secs_listener(_listener)
            _installed = True


def total_compilations() -> int:
    install()
    with _lock:
        return sum(_counts.values())


def compilations_by_function() -> dict[str, int]:
    install()
    with _lock:
        return dict(_counts)


class CompileCounter:
    """Counts backend compilations inside a `with` block; `.by_function` names them."""

    def __enter__(self) -> CompileCounter:
        install()
        self._start = compilations_by_function()
        return self

    def __exit__(self, *exc) -> None:
        end = compilations_by_function()
        self.by_function = {
            k: v - self._start.get(k, 0) for k, v in end.items() if v - self._start.get(k, 0)
        }
        self.count = sum(self.by_function.values())
