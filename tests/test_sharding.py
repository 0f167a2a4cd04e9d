"""Mesh construction, logical-axis rules and model placement on 8 simulated CPU devices."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dynamo_jax import sharding as shd
from dynamo_jax.models import ModelConfig, init_model


def test_make_mesh_shapes_and_axis_types():
    assert jax.device_count() == 8
    mesh = shd.make_mesh()
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert dict(shd.make_mesh(2, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(shd.make_mesh(-1, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(shd.make_mesh(1, -1, 4).shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert shd.make_mesh(devices=jax.devices()[:2]).devices.size == 2
    with pytest.raises(ValueError, match="at most one"):
        shd.make_mesh(-1, -1)
    with pytest.raises(ValueError, match="needs 12 devices"):
        shd.make_mesh(3, 2, 2)
    with pytest.raises(ValueError, match="do not split"):
        shd.make_mesh(-1, 3)


def test_logical_to_spec_rules_and_divisibility():
    mesh = shd.make_mesh(1, 2, 4)
    spec = shd.logical_to_spec(("layers", "embed", "heads", "head_dim"))
    assert spec == P(None, "fsdp", "tensor", None)
    assert shd.logical_to_spec(("batch", "length")) == P(("data", "fsdp"), None)
    # 2 KV heads cannot be split 4 ways: that dimension stays replicated.
    spec = shd.logical_to_spec(("embed", "kv_heads"), shape=(64, 2), mesh=mesh)
    assert spec == P("fsdp", None)
    # A mesh axis is used once per array; later dimensions lose it.
    rules = dict(shd.DEFAULT_RULES, mlp="fsdp")
    assert shd.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", None)
    # Batch over (data, fsdp) keeps the part that divides.
    spec = shd.logical_to_spec(("batch",), shape=(2,), mesh=shd.make_mesh(2, 2, 2))
    assert spec == P("data")
    with pytest.raises(ValueError, match="'bogus'"):
        shd.logical_to_spec(("bogus",))
    sharding = shd.logical_to_sharding(("vocab", "embed"), mesh)
    assert sharding.spec == P("tensor", "fsdp") and sharding.mesh is mesh


def test_batch_sharding_and_constraint():
    mesh = shd.make_mesh(2, 2, 2)
    x = jax.device_put(jnp.arange(32.0).reshape(8, 4), shd.batch_sharding(mesh))
    assert x.sharding.spec == P(("data", "fsdp"))
    starts = {s.index[0].start for s in x.addressable_shards}
    assert starts == {0, 2, 4, 6}  # 4 row blocks (2 copies each, over tensor)

    @jax.jit
    def f(y):
        return shd.with_logical_constraint(y * 2, ("batch", "vocab"), mesh)

    out = f(x)
    assert out.sharding.spec == P(("data", "fsdp"), "tensor")
    np.testing.assert_array_equal(np.asarray(out), np.arange(32.0).reshape(8, 4) * 2)
    assert shd.with_logical_constraint(x, ("batch", None), None) is x


@pytest.fixture(scope="module")
def tiny_config():
    return ModelConfig(
        model_type="qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        qkv_bias=True,
    )


def test_state_shardings_and_shard_model(tiny_config):
    mesh = shd.make_mesh(2, 2, 2)
    model = init_model(tiny_config, 0)
    specs = {
        ".".join(map(str, path)): v.get_value().spec
        for path, v in nnx.to_flat_state(shd.state_shardings(model, mesh))
    }
    assert specs["embed"] == P("tensor", "fsdp")
    assert specs["layers.wq"] == P(None, "fsdp", "tensor", None)
    assert specs["layers.bk"] == P(None, "tensor", None)
    assert specs["layers.w_down"] == P(None, "tensor", "fsdp")
    assert specs["final_norm"] == P(None)

    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (4, 8)))
    forward = nnx.jit(lambda m, x: m(x))
    before = np.asarray(forward(model, ids))
    shd.shard_model(model, mesh)
    assert model.mesh is mesh
    assert model.layers.w_up.get_value().sharding.spec == P(None, "fsdp", "tensor")
    after = np.asarray(forward(model, jax.device_put(ids, shd.batch_sharding(mesh))))
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)


def test_replicated_dimensions_are_listed(tiny_config):
    """What state_shardings silently leaves whole: on a tensor axis of 4, the 2 KV heads of
    wk, wv (and their biases) and nothing else; on (2, 2, 2) nothing."""
    model = init_model(tiny_config, 0)
    assert shd.replicated_dimensions(model, shd.make_mesh(2, 2, 2)) == []
    found = shd.replicated_dimensions(model, shd.make_mesh(1, 2, 4))
    assert found and all("not over tensor (4)" in line and "(2)" in line for line in found)
    assert {line.split(":")[0].split("/")[-1] for line in found} == {"wk", "wv", "bk", "bv"}
    # fsdp 8 splits every 32-wide dimension.
    assert shd.replicated_dimensions(model, shd.make_mesh(1, 8, 1)) == []


def test_init_model_on_mesh(tiny_config):
    mesh = shd.make_mesh(2, 2, 2)
    model = init_model(tiny_config, 0, mesh=mesh)
    assert model.mesh is mesh
    assert model.embed.get_value().sharding.spec == P("tensor", "fsdp")
    assert model.layers.wq.get_value().sharding.spec == P(None, "fsdp", "tensor", None)
    # Same seed, same values as the single-device init (each device drew only its shard).
    plain = init_model(tiny_config, 0)
    for a, b in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(plain)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(plain.layers.attn_norm.get_value()).min() == 1.0
    assert np.abs(np.asarray(plain.layers.wq.get_value())).max() > 0


_FULL_REMAT = "Involuntary full rematerialization"


def test_embedding_lookup_compiles_without_full_rematerialization(tiny_config, capfd):
    """On a data x fsdp x tensor mesh the lookup of an embedding table split ("tensor", "fsdp")
    came out with its width split over fsdp, which XLA's partitioner turns into the activations'
    batch split only by replicating it whole (a warning on stderr, no error), in the forward and
    in the backward. The model reshards the output in two steps (batch over data, then width
    for batch over fsdp): training's forward + backward (tied LM head included) and a cache
    decode compile without the warning. (Gathering the table's width first also silenced it,
    at +3.7 GiB per device for the 7B config: test_paper_configs caught that.)"""
    mesh = shd.make_mesh(2, 2, 2)
    rows, length = 8, 8
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=shd.batch_sharding(mesh))

    # The lookup as it was, to show that XLA's warning reaches the captured stderr here.
    table = jax.ShapeDtypeStruct(
        (tiny_config.vocab_size, tiny_config.hidden_size),
        jnp.float32,
        sharding=NamedSharding(mesh, P("tensor", "fsdp")),
    )

    def old_lookup(table, ids):
        h = jnp.take(table, ids, axis=0, mode="clip")
        return jax.lax.with_sharding_constraint(h, shd.batch_sharding(mesh))

    jax.jit(old_lookup).lower(table, ids).compile()
    if _FULL_REMAT not in capfd.readouterr().err:
        pytest.skip("XLA's partitioner warnings do not reach stderr in this environment")

    config = dataclasses.replace(tiny_config, num_layers=1, tie_word_embeddings=True)
    graphdef, state = nnx.split(init_model(config, 0, mesh=mesh))

    def loss(state, ids):
        return jnp.sum(nnx.merge(graphdef, state)(ids) ** 2)

    def prefill(state, ids):
        model = nnx.merge(graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(length), (rows, length))
        return model.decode(ids, positions, model.init_cache(rows, 2 * length))

    jax.jit(jax.grad(loss)).lower(state, ids).compile()
    jax.jit(prefill).lower(state, ids).compile()
    warnings = [line for line in capfd.readouterr().err.splitlines() if _FULL_REMAT in line]
    assert not warnings, "\n".join(warnings)


def test_initialize_distributed_is_noop_for_single_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert shd.initialize_distributed() is False
    assert shd.initialize_distributed(num_processes=1) is False
    assert calls == []
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert shd.initialize_distributed() is True
    assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None)]
