import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamo_jax.advantages import group_advantages, group_statistics, zero_variance_fraction


def reference(rewards, group_ids, valid, estimator, eps=1e-6):
    """Plain numpy loop over groups (SPEC 3)."""
    out = np.zeros(len(rewards))
    for g in np.unique(group_ids[valid]):
        idx = np.where(valid & (group_ids == g))[0]
        r = rewards[idx].astype(np.float64)
        if len(idx) < 2:
            continue
        if estimator == "grpo":
            out[idx] = (r - r.mean()) / (r.std(ddof=1) + eps)
        elif estimator == "dr_grpo":
            out[idx] = r - r.mean()
        else:
            out[idx] = [r[j] - np.delete(r, j).mean() for j in range(len(r))]
    return out


def random_batch(rng, num_groups, binary):
    sizes = rng.integers(1, 9, size=num_groups)
    sizes[rng.integers(num_groups)] = 1  # always one singleton group
    group_ids = np.repeat(np.arange(num_groups), sizes)
    rewards = (
        rng.choice([-1.0, 1.0], size=len(group_ids)) if binary else rng.normal(size=len(group_ids))
    )
    perm = rng.permutation(len(group_ids))  # groups need not be contiguous
    return rewards[perm].astype(np.float32), group_ids[perm].astype(np.int32)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("binary", [True, False])
def test_matches_numpy_loop_on_ragged_groups(estimator, binary):
    rng = np.random.default_rng(0)
    for _ in range(5):
        rewards, gids = random_batch(rng, 12, binary)
        valid = np.ones(len(rewards), bool)
        got = group_advantages(rewards, gids, valid, num_groups=16, estimator=estimator)
        np.testing.assert_allclose(got, reference(rewards, gids, valid, estimator), atol=2e-5)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_padding_rows_change_nothing(estimator):
    rng = np.random.default_rng(1)
    rewards, gids = random_batch(rng, 10, binary=False)
    base = group_advantages(
        rewards, gids, np.ones(len(rewards), bool), num_groups=10, estimator=estimator
    )
    pad = 7  # padding rows carry garbage rewards and in-range group ids
    r2 = np.concatenate([rewards, rng.normal(size=pad).astype(np.float32) * 100])
    g2 = np.concatenate([gids, rng.integers(0, 10, size=pad).astype(np.int32)])
    v2 = np.concatenate([np.ones(len(rewards), bool), np.zeros(pad, bool)])
    got = np.asarray(group_advantages(r2, g2, v2, num_groups=10, estimator=estimator))
    np.testing.assert_allclose(got[: len(rewards)], base, atol=1e-6)
    assert np.all(got[len(rewards) :] == 0.0)


def test_zero_variance_singletons_and_empty_never_nan():
    rewards = jnp.array([1.0, 1.0, 1.0, -1.0, 0.3, 0.0, 0.0])
    gids = jnp.array([0, 0, 0, 1, 2, 3, 3])
    valid = jnp.array([1, 1, 1, 1, 1, 0, 0], bool)  # group 3: padding only; groups 4..7 empty
    for est in ("grpo", "dr_grpo", "rloo"):
        adv = np.asarray(group_advantages(rewards, gids, valid, num_groups=8, estimator=est))
        assert np.all(np.isfinite(adv)) and np.all(adv == 0.0)
    frac = zero_variance_fraction(rewards, gids, valid, num_groups=8)
    assert float(frac) == pytest.approx(5 / 5)  # 3 rows of group 0 + 2 singletons (std 0)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_groups_of_equal_non_binary_rewards_get_exactly_zero(estimator):
    """A float32 mean of 24 rewards of 0.1 is off by an ulp; GRPO's division by (std + 1e-6)
    once turned that into advantages of ~0.007 (0.1 for some sizes), all of one sign. Equal
    rewards carry no signal: exactly 0, and the group counts as zero-variance."""
    sizes, values = (24, 13, 7, 5), (0.1, 0.7, 0.3, 1.0 / 3.0)
    rewards = np.concatenate([np.full(n, v) for n, v in zip(sizes, values, strict=True)]).astype(
        np.float32
    )
    group_ids = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    valid = np.ones(len(rewards), bool)
    adv = np.asarray(group_advantages(rewards, group_ids, valid, 4, estimator))
    np.testing.assert_array_equal(adv, 0.0)
    assert float(zero_variance_fraction(rewards, group_ids, valid, 4)) == 1.0
    stats = group_statistics(rewards, group_ids, valid, 4)
    np.testing.assert_array_equal(np.asarray(stats.mean), np.float32(values))
    np.testing.assert_array_equal(np.asarray(stats.std), 0.0)
    # One differing row makes the group informative again, with the reference's values.
    rewards[0] = 1.0
    adv = np.asarray(group_advantages(rewards, group_ids, valid, 4, estimator))
    np.testing.assert_allclose(adv, reference(rewards, group_ids, valid, estimator), atol=2e-6)


def test_new_allocation_does_not_recompile():
    rng = np.random.default_rng(2)
    from dynamo_jax.compilation import CompileCounter

    group_advantages(np.zeros(64, np.float32), np.zeros(64, np.int32), np.ones(64, bool), 8)
    with CompileCounter() as counter:
        for _ in range(5):
            sizes = rng.multinomial(64 - 8, np.ones(8) / 8) + 1
            gids = np.repeat(np.arange(8), sizes).astype(np.int32)
            group_advantages(rng.normal(size=64).astype(np.float32), gids, np.ones(64, bool), 8)
    assert counter.count == 0
    with CompileCounter() as counter:
        group_advantages(np.zeros(48, np.float32), np.zeros(48, np.int32), np.ones(48, bool), 8)
    assert counter.count >= 1  # the counter sees compilations at all


def test_group_ids_outside_the_range_are_named_or_count_as_padding():
    """Concrete ids: a valid row with an id outside [0, num_groups) is a ValueError naming the
    row (padding rows may hold any id). Traced ids (inside jit): such a row counts as padding
    and the other rows keep their advantages."""
    rewards = jnp.array([1.0, -1.0, 1.0, -1.0, 1.0])
    valid = jnp.array([True, True, True, True, False])
    with pytest.raises(ValueError, match=r"group_ids\[2\] = 2 is outside \[0, num_groups = 2\)"):
        group_advantages(rewards, jnp.array([0, 0, 2, 1, 0]), valid, num_groups=2)
    with pytest.raises(ValueError, match=r"group_ids\[3\] = -1"):
        group_advantages(rewards, jnp.array([0, 0, 1, -1, 0]), valid, num_groups=2)
    ok = group_advantages(rewards, jnp.array([0, 0, 1, 1, 7]), valid, num_groups=2)  # pad row: 7
    np.testing.assert_allclose(ok, [0.7071, -0.7071, 0.7071, -0.7071, 0.0], atol=1e-4)
    # w_reinforce has no group baseline: any ids, no error, nothing zeroed
    w = group_advantages(rewards, jnp.array([0, 0, 2, -1, 0]), valid, 2, estimator="w_reinforce")
    np.testing.assert_allclose(w, [0.1, -1.0, 0.1, -1.0, 0.0])
    traced = jax.jit(lambda g: group_advantages(rewards, g, valid, num_groups=2))
    for bad in ([0, 0, 1, -1, 0], [0, 0, 1, 2, 0]):
        got = np.asarray(traced(jnp.array(bad)))
        np.testing.assert_allclose(got, [0.7071, -0.7071, 0.0, 0.0, 0.0], atol=1e-4)


def test_shapes_are_checked_with_the_argument_named():
    with pytest.raises(ValueError, match=r"group_advantages: valid has shape \(3,\)"):
        group_advantages(jnp.zeros(4), jnp.zeros(4, jnp.int32), jnp.ones(3, bool), 2)


def test_valid_may_be_int_or_float_and_out_of_range_rows_count_as_padding():
    """`valid` given as int or float 0/1 (or any nonzero int) means what the bool does; it was
    combined bitwise, so valid = 2 dropped the row. zero_variance_fraction counts the rows
    group_advantages counts: inside jit a valid row with an id out of range is padding (it was
    clamped into the last group)."""
    rewards = jnp.asarray([1.0, 0.0, 1.0, 1.0, 0.0])
    ids = jnp.asarray([0, 0, 1, 1, 7])
    ok = np.array([True, True, True, True, False])
    want = group_advantages(rewards, ids, jnp.asarray(ok), 2)
    for valid in (ok.astype(np.int32) * 2, ok.astype(np.float32)):
        np.testing.assert_array_equal(group_advantages(rewards, ids, jnp.asarray(valid), 2), want)
    frac = jax.jit(zero_variance_fraction, static_argnums=3)
    # Groups: 0 = {1, 0} (signal), 1 = {1, 1} (none); row 4 is valid but its id 7 is not a group.
    assert float(frac(rewards, ids, jnp.ones(5, bool), 2)) == 0.5
    assert float(frac(rewards, ids, jnp.asarray(ok, jnp.float32), 2)) == 0.5


def test_non_finite_rewards_and_no_groups_are_named():
    rewards, ids = jnp.asarray([1.0, np.nan, 0.0]), jnp.asarray([0, 0, 1])
    with pytest.raises(ValueError, match=r"rewards\[1\] = nan on a valid row"):
        group_advantages(rewards, ids, jnp.ones(3, bool), 2)
    # On a padding row it changes nothing.
    got = group_advantages(rewards, ids, jnp.asarray([True, False, True]), 2)
    np.testing.assert_array_equal(got, 0.0)
    with pytest.raises(ValueError, match="num_groups = 0 must be >= 1"):
        group_advantages(rewards, ids, jnp.zeros(3, bool), 0)
    with pytest.raises(ValueError, match=r"zero_variance_fraction: valid has shape \(2,\)"):
        zero_variance_fraction(rewards, ids, jnp.ones(2, bool), 2)
