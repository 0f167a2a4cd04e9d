"""The core computations on 8 simulated CPU devices (rows sharded, vocab sharded over `tensor`)
equal the single-device results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dynamo_jax import advantages, losses, modulation

ROWS, LENGTH, D, V, GROUPS = 16, 12, 8, 32, 5


@pytest.fixture(scope="module")
def mesh():
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py must give 8 simulated devices"
    return Mesh(np.array(devices).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


def inputs():
    rng = np.random.default_rng(0)
    group_ids = np.sort(rng.integers(0, GROUPS, ROWS)).astype(np.int32)
    valid = np.ones(ROWS, bool)
    valid[-3:] = False
    return dict(
        hidden=rng.normal(size=(ROWS, LENGTH, D)).astype(np.float32),
        lm_head=(rng.normal(size=(D, V)) / 2).astype(np.float32),
        targets=rng.integers(0, V, size=(ROWS, LENGTH)).astype(np.int32),
        old_logp=-rng.uniform(0.5, 4, size=(ROWS, LENGTH)).astype(np.float32),
        mask=(np.arange(LENGTH)[None] < rng.integers(1, LENGTH + 1, ROWS)[:, None]).astype(
            np.float32
        )
        * valid[:, None],
        rewards=rng.choice([-1.0, 1.0], size=ROWS).astype(np.float32),
        group_ids=group_ids,
        valid=valid,
    )


def step(x, expectation):
    """Advantages -> log-probs -> modulation -> loss, and its gradient: one micro-batch."""

    def loss_fn(hidden, lm_head):
        adv = advantages.group_advantages(x["rewards"], x["group_ids"], x["valid"], GROUPS)
        stats = losses.token_logprobs_and_entropy(
            hidden,
            lm_head,
            x["targets"],
            1.0,
            chunk_size=5,
            with_vocab_expectation=expectation == "vocab",
        )
        final, aux = modulation.modulate_advantages(
            adv,
            stats.entropy,
            stats.logp,
            x["old_logp"],
            x["mask"],
            expectation=expectation,
            expected_pi_lambda=stats.expected_pi_lambda,
        )
        s, n, _ = losses.policy_loss(stats.logp, x["old_logp"], final, x["mask"])
        return losses.loss_value(s, n), (final, aux)

    (loss, (final, aux)), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        x["hidden"], x["lm_head"]
    )
    return loss, final, aux, grads


@pytest.mark.parametrize("expectation", ["sequence", "vocab"])
def test_sharded_equals_single_device(mesh, expectation):
    x = inputs()
    single = jax.jit(step, static_argnums=1)(jax.device_put(x, jax.devices()[0]), expectation)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    specs = {k: rows for k in x}
    specs["lm_head"] = NamedSharding(mesh, P(None, "tensor"))
    sharded_x = {k: jax.device_put(v, specs[k]) for k, v in x.items()}
    assert len(sharded_x["hidden"].sharding.device_set) == 8
    sharded = jax.jit(step, static_argnums=1)(sharded_x, expectation)
    loss1, final1, aux1, grads1 = single
    loss8, final8, aux8, grads8 = sharded
    assert float(loss8) == pytest.approx(float(loss1), rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(final8, final1, atol=1e-5)
    for key in aux1:
        assert float(aux8[key]) == pytest.approx(float(aux1[key]), rel=1e-5, abs=1e-6)
    for g8, g1 in zip(grads8, grads1, strict=True):
        np.testing.assert_allclose(g8, g1, atol=1e-5, rtol=1e-4)
    assert float(jnp.abs(grads1[0]).sum()) > 0
