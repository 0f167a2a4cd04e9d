import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamo_jax import losses

AGGS = losses.LOSS_AGGREGATIONS


# ---- numpy transcription of SPEC 4 (float64) ----
def np_policy_loss(
    logp,
    old,
    a,
    mask,
    agg,
    eps_low=0.2,
    eps_high=0.28,
    c=10.0,
    ref=None,
    kl_coef=0.0,
    kl_est="k3",
    ent=None,
    ent_coef=0.0,
    max_len=None,
):
    a = np.broadcast_to(a[:, None], logp.shape) if a.ndim == 1 else a
    r = np.exp(np.clip(logp - old, -20, 20))
    l = np.maximum(-a * r, -a * np.clip(r, 1 - eps_low, 1 + eps_high))
    l = np.where(a < 0, np.minimum(l, -a * c), l)
    if ref is not None:
        lr = logp - ref
        kl = {"k1": lr, "k2": 0.5 * lr**2, "k3": np.exp(-lr) + lr - 1}[kl_est]
        l = l + kl_coef * kl
    if ent is not None:
        l = l - ent_coef * ent
    rows = [i for i in range(len(l)) if mask[i].sum() > 0]
    if agg == "token_mean":
        return (l * mask).sum() / mask.sum()
    if agg == "seq_mean_token_sum":
        return np.mean([(l[i] * mask[i]).sum() for i in rows])
    if agg == "seq_mean_token_mean":
        return np.mean([(l[i] * mask[i]).sum() / mask[i].sum() for i in rows])
    return np.mean([(l[i] * mask[i]).sum() / (max_len or l.shape[1]) for i in rows])


def batch(seed, rows=8, length=12):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 3.0, size=(rows, length))
    old = logp + rng.normal(size=logp.shape) * 0.4
    old[0, :3] = logp[0, :3] + 3.0  # ratio e^-3 < 1 - eps_low
    old[1, :3] = logp[1, :3] - 3.0  # ratio e^3 > 1 + eps_high, and > c for A < 0 below
    a = rng.normal(size=rows)
    a[1] = -abs(a[1])
    lengths = rng.integers(1, length + 1, size=rows)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float64)
    mask[3] = 0.0  # all-masked row
    ref = logp + rng.normal(size=logp.shape) * 0.2
    ent = rng.uniform(0, 2, size=logp.shape)
    return logp, old, a, mask, ref, ent


F32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kl_est", ["k1", "k2", "k3"])
def test_policy_loss_matches_numpy(agg, kl_est):
    logp, old, a, mask, ref, ent = batch(0)
    want = np_policy_loss(
        logp,
        old,
        a,
        mask,
        agg,
        ref=ref,
        kl_coef=0.1,
        kl_est=kl_est,
        ent=ent,
        ent_coef=0.01,
        max_len=20,
    )
    s, n, aux = losses.policy_loss(
        F32(logp),
        F32(old),
        F32(a),
        F32(mask),
        loss_agg=agg,
        max_response_length=20,
        ref_logp=F32(ref),
        kl_coef=0.1,
        kl_estimator=kl_est,
        entropy=F32(ent),
        entropy_coef=0.01,
    )
    assert float(losses.loss_value(s, n)) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(aux["tokens"]) == mask.sum()


def test_clip_fractions_count_what_they_say():
    logp, old, a, mask, _, _ = batch(1)
    _, _, aux = losses.policy_loss(F32(logp), F32(old), F32(a), F32(mask))
    r = np.exp(logp - old)
    aa = np.broadcast_to(a[:, None], r.shape)
    v = mask > 0
    assert aux["clip_low"] == ((aa < 0) & (r < 0.8) & v).sum()
    assert aux["clip_high"] == ((aa > 0) & (r > 1.28) & v).sum()
    assert aux["dual_clip"] == ((aa < 0) & (r > 10.0) & v).sum()
    assert aux["dual_clip"] > 0 and aux["clip_low"] + aux["clip_high"] > 0


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_accumulate_to_full_batch(agg):
    logp, old, a, mask, ref, ent = batch(2, rows=12)
    kw = dict(loss_agg=agg, ref_logp=None, kl_coef=0.0)

    def pair(lp, sl):
        s, n, _ = losses.policy_loss(lp, F32(old[sl]), F32(a[sl]), F32(mask[sl]), **kw)
        return s, n

    lp = F32(logp)
    s_full, n_full = pair(lp, slice(None))
    full = losses.loss_value(s_full, n_full)
    # uneven micro-batches, one of them holding the all-masked row 3 alone
    cuts = [slice(0, 3), slice(3, 4), slice(4, 9), slice(9, 12)]
    pairs = [pair(lp[c], c) for c in cuts]
    acc = sum(p[0] for p in pairs) / sum(p[1] for p in pairs)
    assert float(acc) == pytest.approx(float(full), rel=1e-6)
    # gradients: sum of micro-batch gradients of loss_sum / total count == full gradient
    g_full = jax.grad(lambda x: losses.loss_value(*pair(x, slice(None))))(lp)
    g_micro = jnp.concatenate([jax.grad(lambda x, c=c: pair(x, c)[0])(lp[c]) for c in cuts])
    np.testing.assert_allclose(g_micro / n_full, g_full, atol=1e-7, rtol=1e-5)


def test_policy_loss_gradient_matches_finite_differences():
    logp, old, a, mask, ref, ent = batch(3)
    kw = dict(ref=ref, kl_coef=0.1, ent=ent, ent_coef=0.01)

    def jloss(x):
        s, n, _ = losses.policy_loss(
            x,
            F32(old),
            F32(a),
            F32(mask),
            ref_logp=F32(ref),
            kl_coef=0.1,
            entropy=F32(ent),
            entropy_coef=0.01,
        )
        return losses.loss_value(s, n)

    g = np.asarray(jax.grad(jloss)(F32(logp)))
    h = 1e-6
    rng = np.random.default_rng(0)
    for i, j in zip(rng.integers(0, 8, 30), rng.integers(0, 12, 30), strict=True):
        if mask[i, j] == 0:
            assert g[i, j] == 0
            continue
        up, dn = logp.copy(), logp.copy()
        up[i, j] += h
        dn[i, j] -= h
        fd = (
            np_policy_loss(up, old, a, mask, "token_mean", **kw)
            - np_policy_loss(dn, old, a, mask, "token_mean", **kw)
        ) / (2 * h)
        assert g[i, j] == pytest.approx(fd, rel=1e-3, abs=1e-6)


def np_token_stats(hidden, w, targets, temperature):
    z = hidden @ w / temperature
    z = z - z.max(-1, keepdims=True)
    logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p = np.exp(logp_all)
    return np.take_along_axis(logp_all, targets[..., None], -1)[..., 0], -(p * logp_all).sum(-1)


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 64])
def test_chunked_equals_unchunked(chunk):
    rng = np.random.default_rng(4)
    rows, length, d, v = 3, 16, 8, 37
    hidden, w = rng.normal(size=(rows, length, d)), rng.normal(size=(d, v)) / 2
    t = rng.integers(0, v, size=(rows, length))
    want_lp, want_h = np_token_stats(hidden, w, t, 0.8)
    got = losses.token_logprobs_and_entropy(
        F32(hidden), F32(w), jnp.asarray(t), 0.8, chunk, with_vocab_expectation=True
    )
    np.testing.assert_allclose(got.logp, want_lp, atol=2e-5)
    np.testing.assert_allclose(got.entropy, want_h, atol=2e-5)
    from dynamo_jax.modulation import vocab_expectation

    np.testing.assert_allclose(
        got.expected_pi_lambda, vocab_expectation(F32(hidden @ w), 0.8), atol=1e-6
    )
    from_logits = losses.logprobs_and_entropy_from_logits(
        F32(hidden @ w), jnp.asarray(t), 0.8, chunk
    )
    np.testing.assert_allclose(from_logits.logp, want_lp, atol=2e-5)
    np.testing.assert_allclose(from_logits.entropy, want_h, atol=2e-5)

    # gradients of chunked == gradients of the plain full-logits computation
    def chunked(hh, ww):
        s = losses.token_logprobs_and_entropy(hh, ww, jnp.asarray(t), 0.8, chunk)
        return jnp.sum(s.logp * 0.3 + s.entropy * 0.7)

    def plain(hh, ww):
        lp = jax.nn.log_softmax(hh @ ww / 0.8, -1)
        ent = -jnp.sum(jnp.exp(lp) * lp, -1)
        return jnp.sum(
            jnp.take_along_axis(lp, jnp.asarray(t)[..., None], -1)[..., 0] * 0.3 + ent * 0.7
        )

    gc = jax.grad(chunked, argnums=(0, 1))(F32(hidden), F32(w))
    gp = jax.grad(plain, argnums=(0, 1))(F32(hidden), F32(w))
    for a, b in zip(gc, gp, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)

    # ... and through the from-logits path (its own hand-written gradient) w.r.t. the logits
    def from_logits_f(z):
        s = losses.logprobs_and_entropy_from_logits(z, jnp.asarray(t), 0.8, chunk)
        return jnp.sum(s.logp * 0.3 + s.entropy * 0.7)

    logits = F32(hidden @ w)
    np.testing.assert_allclose(
        jax.grad(from_logits_f)(logits),
        jax.grad(lambda z: plain(z, jnp.eye(v, dtype=jnp.float32)))(logits),
        atol=2e-5,
        rtol=1e-4,
    )


def test_token_stats_gradient_in_bfloat16_hidden_states():
    """bf16 hidden states (a bf16 model): logits and softmax still float32, gradients come back
    in the inputs' dtypes and agree with the float32 computation to bf16 precision."""
    rng = np.random.default_rng(6)
    hidden, w = rng.normal(size=(4, 6, 16)), rng.normal(size=(16, 50)) / 4
    t = jnp.asarray(rng.integers(0, 50, size=(4, 6)))

    def f(hh, ww):
        s = losses.token_logprobs_and_entropy(hh, ww, t, 1.0, chunk_size=3)
        return jnp.sum(s.logp + 0.5 * s.entropy)

    g32 = jax.grad(f, argnums=(0, 1))(F32(hidden), F32(w))
    g16 = jax.grad(f, argnums=(0, 1))(jnp.asarray(hidden, jnp.bfloat16), F32(w))
    assert g16[0].dtype == jnp.bfloat16 and g16[1].dtype == jnp.float32
    for a, b in zip(g16, g32, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.05, rtol=0.05)


def test_token_stats_gradient_matches_finite_differences():
    rng = np.random.default_rng(5)
    rows, length, d, v = 2, 5, 4, 9
    hidden, w = rng.normal(size=(rows, length, d)), rng.normal(size=(d, v))
    t = rng.integers(0, v, size=(rows, length))
    coef_lp, coef_h = rng.normal(size=(rows, length)), rng.normal(size=(rows, length))

    def np_f(hh, ww):
        lp, h = np_token_stats(hh, ww, t, 1.0)
        return (coef_lp * lp + coef_h * h).sum()

    def j_f(hh, ww):
        s = losses.token_logprobs_and_entropy(hh, ww, jnp.asarray(t), 1.0, chunk_size=2)
        return jnp.sum(F32(coef_lp) * s.logp + F32(coef_h) * s.entropy)

    gh, gw = jax.grad(j_f, argnums=(0, 1))(F32(hidden), F32(w))
    eps = 1e-6
    for idx in [(0, 0, 0), (1, 4, 3), (0, 2, 1)]:
        e = np.zeros_like(hidden)
        e[idx] = eps
        fd = (np_f(hidden + e, w) - np_f(hidden - e, w)) / (2 * eps)
        assert float(gh[idx]) == pytest.approx(fd, rel=1e-3, abs=1e-5)
    for idx in [(0, 0), (3, 8), (2, 5)]:
        e = np.zeros_like(w)
        e[idx] = eps
        fd = (np_f(hidden, w + e) - np_f(hidden, w - e)) / (2 * eps)
        assert float(gw[idx]) == pytest.approx(fd, rel=1e-3, abs=1e-5)


def test_chunking_bounds_logits_memory():
    """Forward+backward never holds a [rows, T, vocab] float32 array: the compiled program's
    temporary memory stays far below that size."""
    rows, length, d, v = 8, 256, 32, 4096
    full_bytes = rows * length * v * 4  # 32 MiB

    chunk_bytes = rows * 16 * v * 4  # 2 MiB

    def temp_bytes(chunk):
        def f(hh, ww, tt):
            s = losses.token_logprobs_and_entropy(hh, ww, tt, 1.0, chunk_size=chunk)
            return jnp.sum(s.logp + s.entropy)

        args = (
            jnp.zeros((rows, length, d)),
            jnp.zeros((d, v)),
            jnp.zeros((rows, length), jnp.int32),
        )
        compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked, unchunked = temp_bytes(16), temp_bytes(length)
    assert unchunked >= full_bytes  # the measurement sees a full logits array when there is one
    assert chunked < 6 * chunk_bytes < full_bytes / 2, (chunked, chunk_bytes)


@pytest.mark.parametrize("chunk", [2, 4])
def test_traced_temperature_and_its_gradient(chunk):
    """The temperature may be a traced array (a sweep inside jit), and its gradient is the true
    one (the hand-written backward does not drop it), through both entry points."""
    rng = np.random.default_rng(7)
    hidden, w = F32(rng.normal(size=(2, 4, 8))), F32(rng.normal(size=(8, 16)))
    t = jnp.asarray(rng.integers(0, 16, size=(2, 4)))

    def plain(hh, ww, temp):
        lp = jax.nn.log_softmax(hh @ ww / temp, -1)
        ent = -jnp.sum(jnp.exp(lp) * lp, -1)
        return jnp.sum(jnp.take_along_axis(lp, t[..., None], -1)[..., 0] * 0.3 + ent * 0.7)

    def from_hidden(hh, ww, temp):
        s = losses.token_logprobs_and_entropy(hh, ww, t, temp, chunk)
        return jnp.sum(s.logp * 0.3 + s.entropy * 0.7)

    def from_logits(hh, ww, temp):
        s = losses.logprobs_and_entropy_from_logits(hh @ ww, t, temp, chunk)
        return jnp.sum(s.logp * 0.3 + s.entropy * 0.7)

    want = jax.grad(plain, argnums=(0, 1, 2))(hidden, w, jnp.float32(0.8))
    for f in (from_hidden, from_logits):
        got = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(hidden, w, jnp.float32(0.8))
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
        assert abs(float(got[2])) > 1e-3  # the temperature gradient is not a dropped zero


def test_shape_errors_name_the_argument():
    """Mismatched shapes are a ValueError naming the function, the argument and the shapes, not a
    broadcasting error from inside XLA (checked while tracing: free under jit)."""
    z, one = jnp.zeros((2, 3)), jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"policy_loss: old_logp has shape \(2, 4\) but logp"):
        losses.policy_loss(z, jnp.zeros((2, 4)), jnp.ones(2), one)
    with pytest.raises(ValueError, match=r"policy_loss: advantages has shape \(3,\); expected"):
        losses.policy_loss(z, z, jnp.ones(3), one)
    with pytest.raises(ValueError, match=r"policy_loss: ref_logp has shape \(3, 2\)"):
        losses.policy_loss(z, z, jnp.ones(2), one, ref_logp=jnp.zeros((3, 2)), kl_coef=0.1)
    with pytest.raises(ValueError, match=r"policy_loss: mask has shape"):
        jax.jit(lambda m: losses.policy_loss(z, z, jnp.ones(2), m))(jnp.ones((2, 2)))
    h, w = jnp.zeros((2, 3, 4)), jnp.zeros((4, 5))
    with pytest.raises(ValueError, match=r"lm_head has 5 rows but hidden states have D = 4"):
        losses.token_logprobs_and_entropy(h, w.T, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"targets \[rows, T\].*targets \(2, 4\)"):
        losses.token_logprobs_and_entropy(h, w, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"from_logits: expected logits \[rows, T, V\]"):
        losses.logprobs_and_entropy_from_logits(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
    # the right shapes still pass, row or token advantages alike
    for adv in (jnp.ones(2), jnp.ones((2, 3))):
        s, n, _ = losses.policy_loss(z, z, adv, one)
        assert float(n) == 6.0


def test_values_the_log_probs_cannot_use_are_named():
    """chunk_size < 1, a temperature <= 0 and (concrete) targets outside the vocabulary were a
    silent clamp or NaN; now each is a ValueError naming it. Traced values still pass (jit)."""
    h, w, t = jnp.ones((2, 3, 4)), jnp.ones((4, 5)), jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="chunk_size = 0 must be >= 1"):
        losses.token_logprobs_and_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="temperature = 0.0 must be > 0"):
        losses.token_logprobs_and_entropy(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match=r"targets\[1, 2\] = 7 is outside the vocabulary \[0, 5\)"):
        losses.token_logprobs_and_entropy(h, w, t.at[1, 2].set(7))
    with pytest.raises(ValueError, match=r"targets\[0, 1\] = -1 is outside"):
        losses.logprobs_and_entropy_from_logits(jnp.ones((2, 3, 5)), t.at[0, 1].set(-1))
    for temp in (np.float32(0), jnp.asarray(-1.0)):  # not only Python numbers
        with pytest.raises(ValueError, match=f"temperature = {float(temp)} must be > 0"):
            losses.token_logprobs_and_entropy(h, w, t, temperature=temp)
    with pytest.raises(ValueError, match="targets have dtype float32; token ids must be integers"):
        losses.token_logprobs_and_entropy(h, w, t.astype(jnp.float32))
    with pytest.raises(ValueError, match="vocab_limit = 2.5 must be an int"):
        losses.token_logprobs_and_entropy(h, w, t, vocab_limit=2.5)
    traced = jax.jit(lambda temp: losses.token_logprobs_and_entropy(h, w, t, temp).logp)
    np.testing.assert_allclose(traced(2.0), np.log(1 / 5), rtol=1e-6)


@pytest.mark.parametrize("chunk", [3, 64])
def test_vocab_limit_equals_the_head_cut_to_the_tokenizer(chunk):
    """vocab_limit = L on a [D, V] head is the distribution of the first L ids: the same
    log-probs, entropy, vocab expectation and gradients as the head sliced to [D, L] (its padded
    columns get no gradient), from hidden states and from logits, never NaN."""
    k = jax.random.split(jax.random.key(11), 3)
    rows, length, dim, vocab, limit = 3, 7, 16, 40, 29
    h = jax.random.normal(k[0], (rows, length, dim))
    w = jax.random.normal(k[1], (dim, vocab)).at[:, limit:].add(4.0)  # padded ids most likely
    t = jax.random.randint(k[2], (rows, length), 0, limit)
    temp = 0.7

    def head_loss(h, w, limit, cut):
        s = losses.token_logprobs_and_entropy(
            h, w[:, :cut], t, temp, chunk, with_vocab_expectation=True, vocab_limit=limit
        )
        return jnp.sum(s.logp) + 0.3 * jnp.sum(s.entropy), s

    (v1, s1), (gh1, gw1) = jax.value_and_grad(head_loss, (0, 1), has_aux=True)(h, w, limit, vocab)
    (v2, s2), (gh2, gw2) = jax.value_and_grad(head_loss, (0, 1), has_aux=True)(h, w, None, limit)
    for a, b in zip(s1, s2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gh1, gh2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw1[:, :limit], gw2[:, :limit], rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(gw1[:, limit:]) == 0) and np.all(np.isfinite(gw1))

    logits = jnp.einsum("rtd,dv->rtv", h, w)
    full = losses.logprobs_and_entropy_from_logits(logits, t, temp, chunk, True, vocab_limit=limit)
    cut = losses.logprobs_and_entropy_from_logits(logits[..., :limit], t, temp, chunk, True)
    for a, b in zip(full, cut, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    g = jax.grad(
        lambda x: jnp.sum(
            losses.logprobs_and_entropy_from_logits(x, t, temp, chunk, vocab_limit=limit).entropy
        )
    )(logits)
    assert np.all(np.asarray(g[..., limit:]) == 0) and np.all(np.isfinite(g))
    with pytest.raises(
        ValueError, match=r"targets\[0, 0\] = 35 is outside the vocabulary \[0, 29\)"
    ):
        losses.token_logprobs_and_entropy(h, w, t.at[0, 0].set(35), temp, chunk, vocab_limit=limit)


def _padded_batch(seed=11):
    rng = np.random.default_rng(seed)
    rows, length = 3, 6
    lp = rng.normal(-1.5, 0.5, (rows, length))
    old = lp + rng.normal(0, 0.1, (rows, length))
    ref = lp + rng.normal(0, 0.1, (rows, length))
    ent = rng.uniform(0.2, 2.0, (rows, length))
    mask = np.ones((rows, length))
    mask[0, 4:] = 0
    mask[2] = 0  # a padding row
    return lp, old, ref, ent, np.array([1.0, -0.5, 2.0]), mask


@pytest.mark.parametrize("agg", AGGS)
def test_non_finite_values_at_padding_change_nothing(agg):
    """NaN or inf where the mask is 0 (a -100 pad id gathered inside jit gives NaN log-probs, a
    model that masks ids gives -inf): the loss, its gradient and aux equal those of the same
    batch with finite padding. A product with the mask let them through (NaN * 0 = NaN)."""
    lp, old, ref, ent, adv, mask = _padded_batch()
    kw = dict(loss_agg=agg, kl_coef=0.1, kl_estimator="k2", entropy_coef=0.01)

    def run(lp, old, ref, ent, adv):
        def f(x):
            s, n, aux = losses.policy_loss(
                x, F32(old), F32(adv), F32(mask), ref_logp=F32(ref), entropy=F32(ent), **kw
            )
            return s, (n, aux)

        (s, (n, aux)), g = jax.value_and_grad(f, has_aux=True)(F32(lp))
        return s, n, aux, g

    want = run(lp, old, ref, ent, adv)
    bad = [a.copy() for a in (lp, old, ref, ent)]
    for x, value in zip(bad, (np.nan, np.nan, -np.inf, np.inf), strict=True):
        x[mask == 0] = value
    bad_adv = adv.copy()
    bad_adv[2] = np.nan  # the padding row's advantage
    got = run(*bad, bad_adv)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    logp_minus_inf = lp.copy()
    logp_minus_inf[mask == 0] = -np.inf
    got = run(logp_minus_inf, old, ref, ent, adv)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_out_of_vocabulary_pad_ids_inside_jit_change_nothing():
    """Inside jit the target range is not checked; a -100 pad id gives a NaN log-prob at its
    (masked) position, and the loss and gradient must equal those with a valid pad id."""
    rng = np.random.default_rng(2)
    rows, length, v = 2, 5, 11
    logits = F32(rng.normal(size=(rows, length, v)))
    t = rng.integers(0, v, size=(rows, length))
    mask = np.ones((rows, length))
    mask[1, 3:] = 0
    pad = t.copy()
    pad[mask == 0] = -100

    @jax.jit
    def loss(logits, targets):
        stats = losses.logprobs_and_entropy_from_logits(logits, targets, 1.0, 2)
        s, n, _ = losses.policy_loss(
            stats.logp, jax.lax.stop_gradient(stats.logp), F32([1.0, -1.0]), F32(mask)
        )
        return s / n

    want, want_g = jax.value_and_grad(loss)(logits, jnp.asarray(t))
    got, got_g = jax.value_and_grad(loss)(logits, jnp.asarray(pad))
    assert np.isfinite(got) and np.isfinite(np.asarray(got_g)).all()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_g)[mask > 0], np.asarray(want_g)[mask > 0], atol=1e-7)


def test_minus_infinity_logits_give_the_entropy_of_the_ids_left():
    """A logit of -inf (an id a model masks out) has probability 0 and adds nothing to the
    entropy (p log p -> 0): the same stats and gradient as a logit of -1e30, not NaN."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2, 3, 7))
    z_inf, z_big = z.copy(), z.copy()
    z_inf[..., 5:] = -np.inf
    z_big[..., 5:] = -1e30
    t = jnp.asarray(rng.integers(0, 5, size=(2, 3)))

    def stats(z):
        def f(z):
            s = losses.logprobs_and_entropy_from_logits(z, t, 1.0, 2, True)
            return jnp.sum(s.entropy) + jnp.sum(s.logp), s

        (_, s), g = jax.value_and_grad(f, has_aux=True)(F32(z))
        return s.logp, s.entropy, s.expected_pi_lambda, g

    for got, want in zip(stats(z_inf), stats(z_big), strict=True):
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    from dynamo_jax.modulation import vocab_expectation

    np.testing.assert_allclose(vocab_expectation(F32(z_inf)), vocab_expectation(F32(z_big)))


def test_max_response_length_below_one_is_refused():
    lp, old, _, _, adv, mask = _padded_batch()
    agg = "seq_mean_token_sum_norm"
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"max_response_length = {bad} must be >= 1"):
            losses.policy_loss(
                F32(lp), F32(old), F32(adv), F32(mask), loss_agg=agg, max_response_length=bad
            )


def test_a_loss_term_without_its_array_is_named_not_dropped():
    """kl_coef, entropy_coef or abs_kl_coef above 0 without ref_logp, entropy or abs_kl_mask
    used to return the plain loss; an unknown kl_estimator passed when no KL was computed."""
    lp, old, ref, ent, adv, mask = _padded_batch()
    args = (F32(lp), F32(old), F32(adv), F32(mask))
    for coef, array in (
        ("kl_coef", "ref_logp"),
        ("entropy_coef", "entropy"),
        ("abs_kl_coef", "abs_kl_mask"),
    ):
        with pytest.raises(ValueError, match=f"{coef} = 0.1 but no {array} was given"):
            losses.policy_loss(*args, **{coef: 0.1})
    with pytest.raises(ValueError, match="kl_estimator 'k9'"):
        losses.policy_loss(*args, kl_estimator="k9")
    with_terms = losses.policy_loss(
        *args, kl_coef=0.1, ref_logp=F32(ref), entropy_coef=0.01, entropy=F32(ent)
    )
    assert np.isfinite(with_terms[0]) and with_terms[0] != losses.policy_loss(*args)[0]
    # Inside the caller's jit the coefficients are traced and pass unchecked.
    traced = jax.jit(lambda c: losses.policy_loss(*args, kl_coef=c)[0])(0.0)
    np.testing.assert_allclose(traced, losses.policy_loss(*args)[0], rtol=1e-6)


def test_a_mask_is_zero_or_one_not_a_weight():
    """A mask value other than 0 and 1 used to weight its token in the loss and the token count
    while the clip counts read it as 1. Concrete input: an error naming the position. Inside a
    caller's jit (values unreadable): read as valid where > 0, the same as 1."""
    lp, old, _, ent, adv, mask = _padded_batch()
    args = (F32(lp), F32(old), F32(adv))
    for bad in (2.0, 0.5, -1.0):
        weird = mask.copy()
        weird[1, 3] = bad
        with pytest.raises(ValueError, match=rf"policy_loss: mask\[1, 3\] = {bad} \(1 such"):
            losses.policy_loss(*args, F32(weird))
        marks = (mask > 0).astype(np.int32)
        marks[0, 2] = 3
        for kw in (dict(grad_mask=marks), dict(abs_kl_mask=marks, abs_kl_coef=0.1)):
            name = next(iter(kw))
            with pytest.raises(ValueError, match=rf"policy_loss: {name}\[0, 2\] = 3 "):
                losses.policy_loss(*args, F32(mask), **kw)
    for dtype in (bool, np.int8, np.float32):
        np.testing.assert_array_equal(
            losses.policy_loss(*args, mask.astype(dtype))[0], losses.policy_loss(*args, mask)[0]
        )
    twos = np.where(mask > 0, 2.0, 0.0)
    for agg in AGGS:
        want = losses.policy_loss(*args, F32(mask), loss_agg=agg)
        got = jax.jit(lambda m, agg=agg: losses.policy_loss(*args, m, loss_agg=agg))(F32(twos))
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)
