import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamo_jax import modulation as mod

EPS_LOW, EPS_HIGH = 0.2, 0.28


# ---- direct numpy transcription of SPEC 2 (float64) ----
def np_softmax_stats(z):
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p = np.exp(logp)
    h = -(p * logp).sum(-1)
    return logp, p, h


def np_modulate(
    a_row,
    logp,
    old_logp,
    h,
    mask,
    alpha=0.2,
    lmin=0.6,
    gamma=50.0,
    tau=0.99,
    e_vocab=None,
    comp=True,
    stab=True,
):
    a = np.broadcast_to(a_row[:, None], logp.shape)
    valid = mask > 0
    h_max, h_min = h[valid].max(), h[valid].min()
    bc = np.where(a > 0, 1 + alpha * (h_max - h) / (h_max - h_min + 1e-8), 1.0)
    r = np.exp(np.clip(logp - old_logp, -20, 20))
    ind = ((a > 0) & (r <= 1 + EPS_HIGH)) | ((a < 0) & (r >= 1 - EPS_LOW))
    xi = ind * r * a
    lam = logp + h
    pl = np.exp(logp) * lam
    if e_vocab is None:
        e = np.array([pl[i][valid[i]].mean() if valid[i].any() else 0.0 for i in range(len(a))])
        e = e[:, None]
    else:
        e = e_vocab
    dh = -xi * (pl - e)
    big_xi = np.where(valid, np.abs(dh), 0.0)
    x = big_xi / (big_xi.max() + 1e-8)
    bs = lmin + (1 - lmin) / (1 + np.exp(gamma * (x - tau)))
    final = a * (bc if comp else 1) * (bs if stab else 1)
    return np.where(valid, final, 0), np.where(valid, bc, 1), np.where(valid, bs, 1), dh


def make_inputs(seed, rows=6, length=9, vocab=11):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, length, vocab)) * 2.0
    y = rng.integers(0, vocab, size=(rows, length))
    logp_all, p, h = np_softmax_stats(z)
    logp = np.take_along_axis(logp_all, y[..., None], -1)[..., 0]
    old_logp = logp + rng.normal(size=logp.shape) * 0.3  # ratios on both sides of the clip
    lengths = rng.integers(1, length + 1, size=rows)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float64)
    mask[-1] = 0.0  # an all-masked (padding) row
    a = rng.normal(size=rows)
    a[1] = 0.0
    e_vocab = (p * p * (logp_all + h[..., None])).sum(-1)
    return z, a, logp, old_logp, h, mask, e_vocab


@pytest.mark.parametrize("expectation", ["sequence", "vocab"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_factors_match_numpy_transcription(expectation, seed):
    z, a, logp, old, h, mask, e_vocab = make_inputs(seed)
    ev = e_vocab if expectation == "vocab" else None
    want_final, want_bc, want_bs, want_dh = np_modulate(a, logp, old, h, mask, e_vocab=ev)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    dh = mod.entropy_change(
        f32(a),
        f32(logp),
        f32(old),
        f32(h),
        f32(mask),
        EPS_LOW,
        EPS_HIGH,
        expectation,
        None if ev is None else f32(ev),
    )
    np.testing.assert_allclose(dh, np.where(mask > 0, want_dh, 0), atol=2e-6)
    bc = mod.beta_comp(f32(a), f32(h), f32(mask), 0.2)
    np.testing.assert_allclose(bc, want_bc, atol=2e-6)
    bs = mod.beta_stab(jnp.abs(dh), f32(mask), 0.6, 50.0, 0.99)
    np.testing.assert_allclose(bs, want_bs, atol=2e-5)
    final, aux = mod.modulate_advantages(
        f32(a),
        f32(h),
        f32(logp),
        f32(old),
        f32(mask),
        expectation=expectation,
        expected_pi_lambda=None if ev is None else f32(ev),
    )
    np.testing.assert_allclose(final, want_final, atol=5e-5)
    pos = (mask > 0) & (a[:, None] > 0)
    assert float(aux["beta_comp_pos_mean"]) == pytest.approx(want_bc[pos].mean(), rel=1e-5)
    assert float(aux["damped_frac"]) == pytest.approx((want_bs[mask > 0] < 0.99).mean())
    assert float(aux["xi_max"]) == pytest.approx(np.abs(want_dh[mask > 0]).max(), rel=1e-5)


def test_switches():
    z, a, logp, old, h, mask, _ = make_inputs(3)
    args = [jnp.asarray(x, jnp.float32) for x in (a, h, logp, old, mask)]
    plain, _ = mod.modulate_advantages(*args, comp=False, stab=False)
    np.testing.assert_allclose(plain, np.where(mask > 0, a[:, None], 0), atol=1e-7)
    for comp, stab in [(True, False), (False, True)]:
        got, _ = mod.modulate_advantages(*args, comp=comp, stab=stab)
        want, *_ = np_modulate(a, logp, old, h, mask, comp=comp, stab=stab)
        np.testing.assert_allclose(got, want, atol=5e-5)


def test_decay_defaults_never_reach_floor():
    # SPEC 2.3: with tau = 0.99, f(1) = 0.6 + 0.4 / (1 + e^0.5) = 0.751.
    xi = jnp.array([[0.0, 0.5, 1.0]])
    bs = mod.beta_stab(xi, jnp.ones_like(xi))
    assert float(bs[0, 2]) == pytest.approx(0.6 + 0.4 / (1 + np.exp(0.5)), abs=1e-5)
    assert float(bs[0, 0]) == pytest.approx(1.0, abs=1e-6)


def test_scope_semantics():
    """mini_batch scope: modulating micro-batches with the update's statistics equals modulating
    the whole update at once; micro_batch scope normalises each micro-batch by its own."""
    _, a, logp, old, h, mask, _ = make_inputs(4, rows=8)
    x = [jnp.asarray(v, jnp.float32) for v in (a, h, logp, old, mask)]
    full, _ = mod.modulate_advantages(*x)
    halves = [[v[:4] for v in x], [v[4:] for v in x]]
    stats = [mod.scope_statistics(hv[0], hv[2], hv[3], hv[1], hv[4]) for hv in halves]
    whole = mod.scope_statistics(x[0], x[2], x[3], x[1], x[4])
    merged = mod.combine_scope_statistics(*stats)
    for got, want in zip(merged, whole, strict=True):
        assert float(got) == pytest.approx(float(want), rel=1e-6)
    mini = jnp.concatenate([mod.modulate_advantages(*hv, scope=merged)[0] for hv in halves])
    np.testing.assert_allclose(mini, full, atol=1e-6)
    micro = jnp.concatenate([mod.modulate_advantages(*hv)[0] for hv in halves])
    want = np.concatenate(
        [
            np_modulate(*(np.asarray(v, np.float64) for v in (hv[0], hv[2], hv[3], hv[1], hv[4])))[
                0
            ]
            for hv in halves
        ]
    )
    np.testing.assert_allclose(micro, want, atol=5e-5)
    assert not np.allclose(micro, full, atol=1e-4)  # the scope matters on this input


def test_all_masked_scope_gives_zeros_not_nan():
    shape = (3, 5)
    final, aux = mod.modulate_advantages(
        jnp.ones(3), jnp.ones(shape), -jnp.ones(shape), -jnp.ones(shape), jnp.zeros(shape)
    )
    assert np.all(np.asarray(final) == 0)
    assert all(np.isfinite(float(v)) for v in aux.values())


def test_a_scope_of_no_tokens_leaves_valid_tokens_finite():
    """Statistics of an empty token set are the merge identities (H_max -inf, H_min +inf,
    max Xi 0); given as the scope of tokens it does not hold (a caller's mistake), they must
    not turn those tokens' advantages into -inf: no boost, finite damping."""
    shape = (2, 3)
    empty = mod.scope_statistics(
        jnp.ones(2), -jnp.ones(shape), -jnp.ones(shape), jnp.ones(shape), jnp.zeros(shape)
    )
    assert float(empty.h_max) == -np.inf and float(empty.h_min) == np.inf
    assert float(empty.xi_max) == 0.0
    h = jnp.full(shape, 0.5)
    bc = mod.beta_comp(jnp.ones(2), h, jnp.ones(shape), 0.2, empty.h_max, empty.h_min)
    np.testing.assert_array_equal(np.asarray(bc), 1.0)
    final, aux = mod.modulate_advantages(
        jnp.array([1.0, -1.0]),
        h,
        -jnp.ones(shape),
        -jnp.ones(shape),
        jnp.ones(shape),
        scope=empty,
    )
    assert np.all(np.isfinite(np.asarray(final)))
    assert np.all(np.abs(np.asarray(final)) <= 1.0)
    assert all(np.isfinite(float(v)) for v in aux.values())


def test_vocab_expectation_is_first_order_entropy_change():
    """Step the logits along the sampled token's policy-gradient direction and measure the
    entropy change with finite differences: it must equal step * dH(vocab)."""
    rng = np.random.default_rng(5)
    vocab, n = 13, 64
    z = rng.normal(size=(n, vocab)) * 1.5
    y = rng.integers(0, vocab, size=n)
    a = rng.normal(size=n)
    logp_all, p, h = np_softmax_stats(z)
    logp = logp_all[np.arange(n), y]
    old = logp + rng.normal(size=n) * 0.2
    r = np.exp(logp - old)
    ind = ((a > 0) & (r <= 1 + EPS_HIGH)) | ((a < 0) & (r >= 1 - EPS_LOW))
    # gradient of the unclipped PPO surrogate r*A w.r.t. the logits: I_clip r A (onehot(y) - pi)
    direction = (ind * r * a)[:, None] * (np.eye(vocab)[y] - p)
    step = 1e-5
    _, _, h_plus = np_softmax_stats(z + step * direction)
    _, _, h_minus = np_softmax_stats(z - step * direction)
    measured = (h_plus - h_minus) / (2 * step)
    e_vocab = mod.vocab_expectation(jnp.asarray(z, jnp.float32))
    dh = mod.entropy_change(
        jnp.asarray(a[:, None], jnp.float32),
        jnp.asarray(logp[:, None], jnp.float32),
        jnp.asarray(old[:, None], jnp.float32),
        jnp.asarray(h[:, None], jnp.float32),
        jnp.ones((n, 1)),
        EPS_LOW,
        EPS_HIGH,
        "vocab",
        e_vocab[:, None],
    )[:, 0]
    np.testing.assert_allclose(dh, measured, atol=2e-5, rtol=1e-3)
    assert np.abs(measured).max() > 1e-2  # the check is not vacuous
    # The sequence expectation is a different (cheaper, approximate) estimate.
    dh_seq = mod.entropy_change(
        jnp.asarray(a, jnp.float32)[None],
        jnp.asarray(logp, jnp.float32)[None],
        jnp.asarray(old, jnp.float32)[None],
        jnp.asarray(h, jnp.float32)[None],
        jnp.ones((1, n)),
        EPS_LOW,
        EPS_HIGH,
        "sequence",
    )[0]
    assert not np.allclose(dh_seq, measured, atol=1e-3)


def test_vocab_expectation_temperature():
    z = jax.random.normal(jax.random.key(0), (4, 7))
    np.testing.assert_allclose(
        mod.vocab_expectation(z, 0.7), mod.vocab_expectation(z / 0.7, 1.0), rtol=1e-5
    )


def test_vocab_mode_requires_expectation():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="expected_pi_lambda"):
        mod.entropy_change(x, -x, -x, x, x, expectation="vocab")


def test_changing_hyperparameters_does_not_recompile():
    _, a, logp, old, h, mask, _ = make_inputs(6)
    x = [jnp.asarray(v, jnp.float32) for v in (a, h, logp, old, mask)]
    mod.modulate_advantages(*x, alpha=0.2, tau=0.99)
    before = mod._modulate_advantages_jit._cache_size()
    for alpha, tau in [(0.4, 0.9), (0.1, 0.5)]:
        mod.modulate_advantages(*x, alpha=alpha, tau=tau)
    assert mod._modulate_advantages_jit._cache_size() == before


def test_no_gradient_flows_through_modulation():
    _, a, logp, old, h, mask, _ = make_inputs(7)
    x = [jnp.asarray(v, jnp.float32) for v in (a, h, logp, old, mask)]

    def f(lp, ent):
        final, _ = mod.modulate_advantages(x[0], ent, lp, x[3], x[4])
        return jnp.sum(final)

    g_lp, g_h = jax.grad(f, argnums=(0, 1))(x[2], x[1])
    assert np.all(np.asarray(g_lp) == 0) and np.all(np.asarray(g_h) == 0)


def test_shape_errors_name_the_argument():
    z, one = jnp.zeros((2, 3)), jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"modulate_advantages: entropy has shape \(2, 4\)"):
        mod.modulate_advantages(jnp.ones(2), jnp.zeros((2, 4)), z, z, one)
    with pytest.raises(ValueError, match=r"modulate_advantages: advantages has shape \(2, 2\)"):
        mod.modulate_advantages(jnp.ones((2, 2)), z, z, z, one)
    with pytest.raises(ValueError, match=r"expected_pi_lambda has shape \(3,\)"):
        mod.modulate_advantages(
            jnp.ones(2), z, z, z, one, expectation="vocab", expected_pi_lambda=jnp.zeros(3)
        )


@pytest.mark.parametrize("expectation", ["sequence", "vocab"])
def test_non_finite_values_at_padding_change_nothing(expectation):
    """NaN or inf where the mask is 0 (log-prob, entropy, old log-prob, E[pi Lambda], a padding
    row's advantage) leave the final advantages and aux exactly as with finite padding. The
    row mean of pi * Lambda was a product with the mask, so one NaN there made max Xi, and with
    it every token's beta_stab, NaN."""
    rng = np.random.default_rng(5)
    rows, length = 3, 6
    lp = rng.normal(-1.0, 0.5, (rows, length))
    old = lp + rng.normal(0, 0.1, (rows, length))
    ent = rng.uniform(0.2, 2.0, (rows, length))
    e = rng.normal(0, 0.1, (rows, length))
    mask = np.ones((rows, length))
    mask[0, 4:] = 0
    mask[2] = 0
    adv = np.array([1.0, -0.5, 2.0])

    def run(lp, old, ent, e, adv):
        f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        return mod.modulate_advantages(
            f32(adv),
            f32(ent),
            f32(lp),
            f32(old),
            f32(mask),
            expectation=expectation,
            expected_pi_lambda=f32(e),
        )

    want = run(lp, old, ent, e, adv)
    for value in (np.nan, np.inf, -np.inf):
        bad = [x.copy() for x in (lp, old, ent, e)]
        for x in bad:
            x[mask == 0] = value
        bad_adv = adv.copy()
        bad_adv[2] = value
        got = run(*bad, bad_adv)
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_building_blocks_name_mismatched_shapes():
    """beta_comp, entropy_change, beta_stab and scope_statistics broadcast a [T] or [rows, 1]
    argument over the rows without a word (misaligned values); now each names it, as
    modulate_advantages does."""
    z, one = jnp.zeros((2, 3)), jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"beta_comp: entropy has shape \(3,\) but mask"):
        mod.beta_comp(jnp.ones(2), jnp.zeros(3), one)
    with pytest.raises(ValueError, match=r"beta_comp: advantages has shape \(3,\); expected"):
        mod.beta_comp(jnp.ones(3), z, one)
    with pytest.raises(ValueError, match=r"entropy_change: old_logp has shape \(2, 1\)"):
        mod.entropy_change(jnp.ones(2), z, jnp.zeros((2, 1)), z, one)
    with pytest.raises(ValueError, match=r"entropy_change: expected_pi_lambda has shape \(3,\)"):
        mod.entropy_change(
            jnp.ones(2), z, z, z, one, expectation="vocab", expected_pi_lambda=jnp.zeros(3)
        )
    with pytest.raises(ValueError, match=r"beta_stab: xi_abs has shape \(3,\) but mask"):
        mod.beta_stab(jnp.zeros(3), one)
    with pytest.raises(
        ValueError, match=r"entropy_change: logp has shape \(2, 3\) but mask has \(3,\)"
    ):
        mod.scope_statistics(jnp.ones(2), z, z, z, jnp.ones(3))
    # Row advantages as [rows] or [rows, 1] alike.
    for adv in (jnp.ones(2), jnp.ones((2, 1))):
        np.testing.assert_array_equal(mod.beta_comp(adv, z, one), 1.0)


def test_a_mask_is_zero_or_one_not_a_weight():
    """A mask of 2 weighted the row mean of pi * Lambda (the `sequence` expectation). Concrete
    input: an error naming the position, from every public function taking a mask. Inside a
    caller's jit: valid where > 0, the same result as 1."""
    rng = np.random.default_rng(3)
    lp = jnp.asarray(rng.normal(-1.0, 0.5, (3, 5)), jnp.float32)
    old = lp + 0.05
    ent = jnp.asarray(rng.uniform(0.2, 2.0, (3, 5)), jnp.float32)
    a = jnp.asarray([1.0, -0.5, 0.7])
    mask = np.ones((3, 5), np.float32)
    mask[2, 3:] = 0
    weird = mask.copy()
    weird[2, 1] = 2.0
    calls = {
        "modulate_advantages": lambda m: mod.modulate_advantages(a, ent, lp, old, m),
        "beta_comp": lambda m: mod.beta_comp(a, ent, m),
        "entropy_change": lambda m: mod.entropy_change(a, lp, old, ent, m),
        "beta_stab": lambda m: mod.beta_stab(ent, m),
        "scope_statistics": lambda m: mod.scope_statistics(a, lp, old, ent, m),
    }
    for name, call in calls.items():
        fn = "entropy_change" if name == "scope_statistics" else name
        with pytest.raises(ValueError, match=rf"{fn}: mask\[2, 1\] = 2.0 \(1 such values\)"):
            call(weird)
    twos = jnp.asarray(mask * 2)
    want = mod.modulate_advantages(a, ent, lp, old, mask)
    got = jax.jit(lambda m: mod.modulate_advantages(a, ent, lp, old, m))(twos)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)
    keyword = mod.modulate_advantages(a, ent, lp, old, mask=jnp.asarray(mask, jnp.int32))
    np.testing.assert_array_equal(keyword[0], want[0])
