import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamo_jax import checkpoint
from dynamo_jax import sharding as shd
from dynamo_jax.allocation import PromptStats
from dynamo_jax.checkpoint import RunCheckpointer, from_jsonable, to_jsonable


def test_json_round_trip_is_exact():
    tree = {
        "a": np.array([0.1, 1 / 3, 1e-300]),
        "b": np.array(["x", "yy"]),
        "c": [1, 2.5],
        "d": np.int64(7),
    }
    back = from_jsonable(to_jsonable(tree))
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert back["a"].dtype == np.float64 and list(back["b"]) == ["x", "yy"]
    assert back["c"] == [1, 2.5] and back["d"] == 7


def test_save_restore_keeps_last_k_and_shardings(tmp_path):
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
    state = {"w": jax.device_put(jnp.arange(32.0).reshape(4, 8), sharding), "step": jnp.int32(3)}
    stats = PromptStats()
    stats.update(["p1", "p2"], [8, 4], [3, 1], decay=0.9)
    stats.update(["p1"], [8], [5], decay=0.9)
    ckpt = RunCheckpointer(tmp_path / "ckpt", keep=2)
    for step in (1, 2, 3):
        ckpt.save(
            step,
            state,
            {
                "step": step,
                "prompt_stats": stats.state_dict(),
                "iterator": {"epoch": 0, "position": step},
            },
        )
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    ckpt.close()

    again = RunCheckpointer(tmp_path / "ckpt", keep=2)
    target = {"w": jax.device_put(jnp.zeros((4, 8)), sharding), "step": jnp.int32(0)}
    restored, host = again.restore_latest(target)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert restored["w"].sharding.is_equivalent_to(sharding, 2)
    assert int(restored["step"]) == 3 and host["iterator"]["position"] == 3
    back = PromptStats.from_state_dict(host["prompt_stats"])
    for key in ("k", "G"):
        np.testing.assert_array_equal(back.state_dict()[key], stats.state_dict()[key])
    assert list(back.ids) == ["p1", "p2"]


def test_restore_latest_without_checkpoints_is_none(tmp_path):
    assert RunCheckpointer(tmp_path / "empty").restore_latest({"x": jnp.zeros(2)}) is None


def test_restoring_into_a_state_of_other_shapes_names_the_arrays(tmp_path):
    """A run resumed with, say, another hidden size: a short error before any array is read
    (Orbax's own failure is pages of internals), and the host state stays readable."""
    import pytest

    from dynamo_jax.checkpoint import StateMismatchError

    ckpt = RunCheckpointer(tmp_path / "ckpt")
    ckpt.save(1, {"w": jnp.zeros((4, 8)), "b": jnp.zeros(8)}, {"config": "{}", "step": 1})
    with pytest.raises(StateMismatchError, match=r"saved only: \[\(\(4, 8\), 'float32'\)\]"):
        ckpt.restore_latest({"w": jnp.zeros((4, 6)), "b": jnp.zeros(8)})
    with pytest.raises(StateMismatchError, match="holds 2 arrays, this run's train state 3"):
        ckpt.restore_latest({"w": jnp.zeros((4, 8)), "b": jnp.zeros(8), "c": jnp.zeros(1)})
    assert ckpt.host_state(1) == {"config": "{}", "step": 1}
    restored, _ = ckpt.restore_latest({"w": jnp.ones((4, 8)), "b": jnp.ones(8)})
    np.testing.assert_array_equal(restored["w"], 0.0)


@pytest.mark.skipif(not checkpoint.DRAINS_ORBAX_LOOPS, reason="Python >= 3.14")
def test_a_failed_orbax_read_leaves_no_asyncio_work_behind(tmp_path, monkeypatch):
    """Orbax closes its event loop as soon as one array read fails, with the other reads still
    pending; unhandled, they later report "Event loop is closed" from TensorStore's threads and
    "coroutine ... was never awaited", in whatever test runs then. The restore drains them."""
    import gc
    import sys
    import time
    import warnings

    import pytest

    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
    ckpt = RunCheckpointer(tmp_path / "ckpt")
    ckpt.save(1, {f"w{i}": jnp.zeros((16, 32)) for i in range(16)}, {"step": 1})
    other = {f"w{i}": jnp.zeros((16, 48 if i == 5 else 32)) for i in range(16)}
    other = jax.device_put(other, sharding)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(ckpt, "saved_arrays", lambda step: None)  # Orbax's own read fails
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        for _ in range(10):
            with pytest.raises(ValueError, match="is not compatible with the stored shape"):
                ckpt.restore(1, other)
        time.sleep(0.2)
        gc.collect()
    assert [str(u.exc_value) for u in unraisable] == []
    assert [str(w.message) for w in warned if "never awaited" in str(w.message)] == []


@pytest.mark.skipif(not checkpoint.DRAINS_ORBAX_LOOPS, reason="Python >= 3.14")
def test_a_loop_made_within_orbax_loops_drained_ends_its_tasks_before_closing():
    """What Orbax's restore does with its event loop: start every read, run until the first
    one fails, close the loop. Closed within `orbax_loops_drained`, the other reads end first
    (deterministic, unlike the warnings they otherwise cause later)."""
    import asyncio
    import time

    import pytest

    from dynamo_jax.checkpoint import orbax_loops_drained

    tasks = []

    async def read(fails: bool) -> None:
        if fails:
            raise ValueError("another shape")
        await asyncio.to_thread(time.sleep, 0.2)  # a read still in flight at the failure

    async def restore() -> None:
        tasks.extend(asyncio.ensure_future(read(fails)) for fails in (False, True))
        await asyncio.gather(*tasks)

    with orbax_loops_drained():
        loop = asyncio.new_event_loop()
    with pytest.raises(ValueError, match="another shape"):
        loop.run_until_complete(restore())
    assert not tasks[0].done()
    loop.close()
    assert loop.is_closed() and all(task.done() for task in tasks)
    assert type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy  # put back
