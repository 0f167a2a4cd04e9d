import jax
import jax.numpy as jnp
import numpy as np

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
