"""Sampler: compile counts, greedy/log-prob parity with the full forward, prefix sharing,
packing independence, sharding, EOS handling, knobs, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynamo_jax import sharding as shd
from dynamo_jax.buckets import BucketSpec
from dynamo_jax.models import ModelConfig, init_model
from dynamo_jax.sampling import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_PADDING,
    Sampler,
    SamplingParams,
    _filter_threshold_bisect,
    _filter_threshold_sort,
    sample_tokens,
)

CFG = ModelConfig(
    model_type="qwen2",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    qkv_bias=True,
)
SPEC = BucketSpec(
    prompt_len_buckets=(8, 16), row_buckets=16, prompt_count_buckets=4, max_new_tokens=10
)
EOS = 3
PAD = 0


def _prompts(rng, lengths):
    # Avoid EOS / PAD inside prompts so tests read cleanly.
    return [rng.integers(4, CFG.vocab_size, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    m = init_model(CFG, 0)
    # Sharper logits than normal(0.02) init so greedy/top-k paths are far from ties.
    state = nnx.state(m)
    state = jax.tree.map(lambda x: x * 8.0 if x.ndim >= 2 else x, state)
    nnx.update(m, state)
    return m


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(model, eos_ids=(EOS,), pad_id=PAD, spec=SPEC)


@pytest.fixture(scope="module")
def forward(model):
    """Full causal forward without cache, [R, T] -> [R, T, V] float32 logits (one compile)."""
    graphdef = nnx.graphdef(model)
    fn = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    return lambda ids: np.asarray(fn(nnx.state(model), jnp.asarray(ids)))


def _sequences(r):
    """[R, P + M] rows of prompt (unpadded) followed by the response, right-padded with PAD."""
    p, m = r.prompt_tokens.shape[1], r.response_tokens.shape[1]
    ids = np.full((r.num_rows, p + m), PAD, np.int32)
    for i in range(r.num_rows):
        n = r.prompt_lengths[i]
        ids[i, :n] = r.prompt_tokens[i, :n]
        ids[i, n : n + m] = r.response_tokens[i]
    return ids


def _check_invariants(r, m):
    valid = r.valid
    assert (r.response_lengths[~valid] == 0).all()
    assert (r.response_mask[~valid] == 0).all()
    assert (r.finish_reason[~valid] == FINISH_PADDING).all()
    np.testing.assert_array_equal(r.response_mask.sum(-1), r.response_lengths)
    for i in np.flatnonzero(valid):
        n = r.response_lengths[i]
        toks = r.response_tokens[i]
        assert (toks[n:] == PAD).all() and (r.response_logp[i, n:] == 0).all()
        assert EOS not in toks[: n - 1].tolist()
        if r.finish_reason[i] == FINISH_EOS:
            assert toks[n - 1] == EOS
        else:
            assert r.finish_reason[i] == FINISH_LENGTH and n == m and EOS not in toks.tolist()


def test_twenty_random_allocations_compile_once(model):
    s = Sampler(model, eos_ids=(EOS,), pad_id=PAD, spec=SPEC)
    rng = np.random.default_rng(0)
    for call in range(20):
        n = int(rng.integers(1, 5))  # <= 4 prompt slots
        sizes = rng.multinomial(int(rng.integers(n, 17)) - n, np.ones(n) / n) + 1  # <= 16 rows
        prompts = _prompts(rng, rng.integers(1, 9, size=n))  # P bucket 8
        ids = rng.integers(0, 10**12, size=n)
        r = s.generate(model, prompts, ids, sizes, jax.random.key(call))
        assert r.plan.static_dims == (4, 8, 16, SPEC.max_new_tokens)
        assert r.valid.sum() == sizes.sum()
        np.testing.assert_array_equal(r.prompt_id[r.valid], np.repeat(ids, sizes))
        np.testing.assert_array_equal(r.group_id[r.valid], np.repeat(np.arange(n), sizes))
        _check_invariants(r, SPEC.max_new_tokens)
    assert s.num_compilations() == {"prefill": 1, "decode": 1}


def test_greedy_matches_full_forward_argmax(model, sampler, forward):
    rng = np.random.default_rng(1)
    prompts = _prompts(rng, [5, 8, 3, 7])
    r = sampler.generate(model, prompts, [1, 2, 3, 4], [3, 1, 2, 4], jax.random.key(0), greedy=True)
    ids = _sequences(r)
    m = SPEC.max_new_tokens
    logits = forward(ids)
    for i in np.flatnonzero(r.valid):
        n, length = r.prompt_lengths[i], r.response_lengths[i]
        expected = logits[i, n - 1 : n - 1 + length].argmax(-1)
        np.testing.assert_array_equal(r.response_tokens[i, :length], expected)
    # Rows of the same prompt are identical under greedy decoding.
    rows = np.flatnonzero(r.group_id == 0)[:3]
    assert (r.response_tokens[rows] == r.response_tokens[rows[0]]).all()
    _check_invariants(r, m)


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 1.0, 0), (1.3, 0.8, 5)])
def test_logp_match_full_forward(model, sampler, forward, temperature, top_p, top_k):
    rng = np.random.default_rng(2)
    prompts = _prompts(rng, [6, 2, 8])
    r = sampler.generate(
        model,
        prompts,
        [7, 8, 9],
        [5, 4, 6],
        jax.random.key(3),
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
    )
    logits = forward(_sequences(r))
    logp_all = np.asarray(jax.nn.log_softmax(jnp.asarray(logits) / temperature, axis=-1))
    for i in np.flatnonzero(r.valid):
        n, length = r.prompt_lengths[i], r.response_lengths[i]
        toks = r.response_tokens[i, :length]
        expected = logp_all[i, np.arange(n - 1, n - 1 + length), toks]
        np.testing.assert_allclose(r.response_logp[i, :length], expected, atol=1e-4)
        if top_k:
            # Every sampled token lies in the top-k of its (full) distribution.
            ranks = (
                logits[i, np.arange(n - 1, n - 1 + length)]
                > logits[i, np.arange(n - 1, n - 1 + length), toks][:, None]
            ).sum(-1)
            assert (ranks < top_k).all()
    assert r.temperature == pytest.approx(temperature)


def test_shared_prefix_equals_separate_prefill(model, sampler):
    rng = np.random.default_rng(4)
    prompts = _prompts(rng, [4, 7, 2])
    ids, sizes = [100, 2**40 + 5, 7], [2, 1, 3]
    shared = sampler.generate(model, prompts, ids, sizes, jax.random.key(9))
    # Same rows, each prefilled on its own (group size 1, sample index set by offsets).
    rep = np.repeat(np.arange(3), sizes)
    offsets = np.concatenate([np.arange(n) for n in sizes])
    separate = sampler.generate(
        model,
        [prompts[i] for i in rep],
        np.asarray(ids)[rep],
        [1] * len(rep),
        jax.random.key(9),
        sample_offsets=offsets,
    )
    v = shared.valid
    assert separate.plan.num_prompt_slots > shared.plan.num_prompt_slots
    np.testing.assert_array_equal(shared.sample_index[v], separate.sample_index[separate.valid])
    np.testing.assert_array_equal(shared.response_tokens[v], separate.response_tokens[: v.sum()])
    np.testing.assert_allclose(
        shared.response_logp[v], separate.response_logp[: v.sum()], atol=1e-4
    )
    # Different samples of one prompt differ (randomness is per sample index).
    assert (shared.response_tokens[0] != shared.response_tokens[1]).any()


def test_rows_do_not_depend_on_packing(model, sampler):
    rng = np.random.default_rng(5)
    x, y, z = _prompts(rng, [5, 3, 8])
    a = sampler.generate(model, [x, y], [11, 22], [2, 3], jax.random.key(1))
    b = sampler.generate(model, [z, y, x], [33, 22, 11], [6, 4, 3], jax.random.key(1))
    for pid, n in [(11, 2), (22, 3)]:
        ra = np.flatnonzero(a.prompt_id == pid)[:n]
        rb = np.flatnonzero(b.prompt_id == pid)[:n]
        np.testing.assert_array_equal(a.sample_index[ra], b.sample_index[rb])
        np.testing.assert_array_equal(a.response_tokens[ra], b.response_tokens[rb])
    c = sampler.generate(model, [x, y], [11, 22], [2, 3], jax.random.key(2))
    assert (c.response_tokens != a.response_tokens).any()  # the step key matters


def test_sharded_matches_single_device(model, sampler):
    assert jax.device_count() == 8
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    sharded_model = shd.shard_model(init_model(CFG, 0), mesh)
    nnx.update(sharded_model, jax.device_put(nnx.state(model), shd.state_shardings(model, mesh)))
    s8 = Sampler(sharded_model, eos_ids=(EOS,), pad_id=PAD, spec=SPEC)
    assert s8.mesh is mesh and s8.batch_shards == 4
    rng = np.random.default_rng(6)
    prompts = _prompts(rng, [3, 8, 6])
    args = (prompts, [1, 2, 3], [4, 5, 3], jax.random.key(4))
    r1 = sampler.generate(model, *args, temperature=0.9)
    r8 = s8.generate(sharded_model, *args, temperature=0.9)
    np.testing.assert_array_equal(r1.response_tokens, r8.response_tokens)
    np.testing.assert_array_equal(r1.finish_reason, r8.finish_reason)
    np.testing.assert_allclose(r1.response_logp, r8.response_logp, atol=1e-4)
    # The reused (donated) row cache keeps its sharding: a second call compiles nothing.
    s8.generate(sharded_model, prompts, [4, 5, 6], [1, 2, 3], jax.random.key(5))
    assert s8.num_compilations() == {"prefill": 1, "decode": 1}


def test_eos_early_exit_and_finish_reasons(model):
    many_eos = tuple(range(1, 65))  # half the vocabulary ends a response
    s = Sampler(model, eos_ids=many_eos, pad_id=PAD, spec=SPEC)
    rng = np.random.default_rng(7)
    r = s.generate(model, _prompts(rng, [4, 6]), [1, 2], [5, 6], jax.random.key(0))
    v = r.valid
    assert (r.finish_reason[v] == FINISH_EOS).all()
    assert r.num_decode_steps == r.response_lengths.max() < SPEC.max_new_tokens  # early exit
    for i in np.flatnonzero(v):
        n = r.response_lengths[i]
        assert r.response_tokens[i, n - 1] in many_eos
        assert not np.isin(r.response_tokens[i, : n - 1], many_eos).any()
        assert (r.response_tokens[i, n:] == PAD).all() and (r.response_mask[i, n:] == 0).all()
        assert (r.response_mask[i, :n] == 1).all()
    assert (r.finish_reason[~v] == FINISH_PADDING).all() and (r.response_mask[~v] == 0).all()
    # No EOS ids at all: every valid row runs to max_new_tokens.
    s_none = Sampler(model, eos_ids=(), pad_id=PAD, spec=SPEC)
    r = s_none.generate(model, _prompts(rng, [4]), [1], [3], jax.random.key(0))
    assert (r.finish_reason[r.valid] == FINISH_LENGTH).all()
    assert (r.response_lengths[r.valid] == SPEC.max_new_tokens).all()


def test_top_k_one_equals_greedy_and_knobs_do_not_recompile(model, sampler):
    rng = np.random.default_rng(8)
    args = (_prompts(rng, [5, 7]), [1, 2], [3, 4], jax.random.key(5))
    greedy = sampler.generate(model, *args, greedy=True)
    before = sampler.num_compilations()
    top1 = sampler.generate(model, *args, top_k=1, temperature=1.7)
    np.testing.assert_array_equal(greedy.response_tokens, top1.response_tokens)
    for kw in [
        dict(temperature=0.3),
        dict(top_p=0.5),
        dict(top_k=7, top_p=0.9, temperature=2.0),
        dict(greedy=True, temperature=0.5),
    ]:
        sampler.generate(model, *args, **kw)
    assert sampler.num_compilations() == before


def test_errors(model, sampler):
    rng = np.random.default_rng(9)
    with pytest.raises(ValueError, match=r"prompt length 17 .* largest is 16"):
        sampler.generate(model, _prompts(rng, [3, 17]), [1, 2], [1, 1], jax.random.key(0))
    with pytest.raises(ValueError, match="number of rows 17 .* largest is 16"):
        Sampler(model, eos_ids=(EOS,), pad_id=PAD, spec=BucketSpec((8,), (8, 16), 4, 4)).generate(
            model, _prompts(rng, [3]), [1], [17], jax.random.key(0)
        )
    with pytest.raises(ValueError, match="temperature"):
        sampler.generate(model, _prompts(rng, [3]), [1], [1], jax.random.key(0), temperature=0)
    with pytest.raises(ValueError, match="empty"):
        sampler.generate(model, [[]], [1], [1], jax.random.key(0))
    # an id outside the vocabulary would be clamped by the embedding lookup: named instead
    bad = _prompts(rng, [3, 4])
    bad[1][2] = CFG.vocab_size
    with pytest.raises(ValueError, match=r"prompt 1 \(id 8\) has token 128 at position 2, outside"):
        sampler.generate(model, bad, [7, 8], [1, 1], jax.random.key(0))


@pytest.mark.parametrize("vocab", [128, 131])  # 131 is prime: the vocabulary gets padded
def test_sample_tokens_distribution(vocab):
    rows = 8000
    logits = jax.random.normal(jax.random.key(0), (vocab,)) * 2.0
    batch = jnp.broadcast_to(logits, (rows, vocab))
    keys = jax.random.split(jax.random.key(1), rows)
    sample = jax.jit(sample_tokens)
    probs = np.asarray(jax.nn.softmax(logits / 0.8))
    order = np.argsort(-probs)

    def freq(**kw):
        toks, logp = sample(batch, keys, SamplingParams.make(temperature=0.8, **kw))
        toks = np.asarray(toks)
        np.testing.assert_allclose(np.asarray(logp), np.log(probs[toks]), rtol=1e-5, atol=1e-5)
        return np.bincount(toks, minlength=vocab) / rows

    f = freq()
    assert np.abs(f - probs).max() < 0.015
    f = freq(top_k=4)
    assert set(np.flatnonzero(f)) <= set(order[:4])
    np.testing.assert_allclose(f[order[:4]], probs[order[:4]] / probs[order[:4]].sum(), atol=0.02)
    # top-p: the smallest prefix of the sorted distribution with mass >= p.
    cum = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cum, 0.6) + 1)]
    f = freq(top_p=0.6)
    assert set(np.flatnonzero(f)) <= set(keep)
    np.testing.assert_allclose(f[keep], probs[keep] / probs[keep].sum(), atol=0.02)
    # Zero-probability tokens are never drawn, whatever the uniforms.
    masked = batch.at[:, ::2].set(-jnp.inf)
    toks, _ = sample(masked, keys, SamplingParams.make())
    assert (np.asarray(toks) % 2 == 1).all()


def test_bisect_filter_matches_sort_filter():
    # Rows with ties, -inf entries and a wide dynamic range.
    x = jax.random.normal(jax.random.key(2), (6, 131)) * jnp.array([[1.0], [5.0], [30.0]] * 2)
    x = x.at[0, :10].set(2.5).at[1, ::3].set(-jnp.inf).at[2].set(jnp.round(x[2]))
    w = jnp.exp(x - x.max(-1, keepdims=True))
    bisect = jax.jit(_filter_threshold_bisect)
    sort = jax.jit(_filter_threshold_sort)
    for k, p in [(0, 0.9), (1, 1.0), (5, 1.0), (10, 0.5), (131, 0.3), (500, 0.99), (3, 0.01)]:
        args = (x, w, jnp.int32(k), jnp.float32(p))
        np.testing.assert_array_equal(np.asarray(bisect(*args)), np.asarray(sort(*args)))
    # Ties at the top-k cut, then top-p over all of them: [2, 1, 1, 1, 0] with k = 2 keeps the
    # three 1s (threshold 1), and p = 0.6 is not reached by the 2 alone.
    x = jnp.array([[2.0, 1.0, 1.0, 1.0, 0.0]])
    w = jnp.exp(x - 2.0)
    args = (x, w, jnp.int32(2), jnp.float32(0.6))
    assert float(bisect(*args)[0]) == float(sort(*args)[0]) == 1.0


def test_committed_params_do_not_recompile_decode(model):
    """Without a mesh, committed parameters (e.g. a train state placed on a device) made the
    decode's returned cache buffer committed while the first call's fresh one was not: the
    second call compiled the decode again (a backend compile, not a new trace)."""
    from dynamo_jax.compilation import CompileCounter

    s = Sampler(model, eos_ids=(EOS,), pad_id=PAD, spec=SPEC)
    state = jax.device_put(nnx.state(model), jax.devices()[0])
    rng = np.random.default_rng(9)
    s.generate(state, _prompts(rng, [4, 6]), [1, 2], [3, 4], jax.random.key(0))
    for call in range(2):
        with CompileCounter() as c:
            s.generate(state, _prompts(rng, [5, 3]), [3, 4], [2, 5], jax.random.key(call + 1))
        assert c.count == 0, c.by_function


def test_ids_past_the_tokenizer_are_never_sampled(model):
    """A model vocabulary padded past the tokenizer (here 128 logits, 100 tokens; Qwen2.5:
    151936 and 151665): with vocab_limit the padded ids are never drawn (they would decode to
    nothing and still be trained on) and log-probs are normalised over the real ids."""
    limit = 100
    rows = 4000
    logits = jnp.zeros((rows, CFG.vocab_size)).at[:, limit:].set(3.0)  # padding ids most likely
    keys = jax.random.split(jax.random.key(3), rows)
    toks, logp = jax.jit(sample_tokens, static_argnums=(3, 4))(
        logits, keys, SamplingParams.make(), "bisect", limit
    )
    assert int(np.max(toks)) < limit and len(np.unique(toks)) > 90
    np.testing.assert_allclose(np.asarray(logp), -np.log(limit), rtol=1e-5)
    s = Sampler(model, eos_ids=(EOS,), pad_id=PAD, spec=SPEC, vocab_limit=limit)
    rng = np.random.default_rng(5)
    r = s.generate(nnx.state(model), _prompts(rng, [4, 7]), [1, 2], [6, 6], jax.random.key(4))
    assert r.response_tokens[r.response_mask > 0].max() < limit
    _check_invariants(r, SPEC.max_new_tokens)


def test_sampler_and_loss_give_the_same_log_probs_over_a_limited_vocabulary(model):
    """The behaviour policy with vocab_limit is the distribution over the tokenizer's ids, and
    the train step's log-probs with the same limit are its log-probs: the ratio of an unchanged
    policy is 1, also where the model's vocabulary is padded past the tokenizer."""
    from dynamo_jax import train_step as ts

    limit = 100
    s = Sampler(model, eos_ids=(EOS,), pad_id=PAD, spec=SPEC, vocab_limit=limit)
    rng = np.random.default_rng(8)
    state = nnx.state(model)
    r = s.generate(
        state, _prompts(rng, [5, 9, 3]), [1, 2, 3], [3, 2, 2], jax.random.key(9), temperature=0.8
    )
    batch = ts.batch_from_rollouts(
        r.prompt_tokens, r.prompt_lengths, r.response_tokens, r.response_mask, pad_id=PAD
    )
    graphdef, params, rest = ts.split_model(model)
    for vocab_limit, close in ((limit, True), (None, False)):
        stats = ts.response_token_stats(
            graphdef, params, rest, batch, 0.8, 4, vocab_limit=vocab_limit
        )
        mask = r.response_mask > 0
        diff = np.abs(np.asarray(stats.logp)[mask] - r.response_logp[mask]).max()
        assert (diff < 1e-4) == close, (vocab_limit, diff)


def test_at_most_one_row_cache_is_kept(model):
    """Calls in two prompt-length buckets (8 and 16) need caches of two shapes: the kept one of
    the first is dropped before the second is allocated (both alive would double the cache the
    memory plan counts), the same shape is reused, and release_buffers frees it."""
    s = Sampler(model, eos_ids=(EOS,), pad_id=PAD, spec=SPEC)
    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    for lengths in ([3, 5], [12, 14], [12, 14]):
        s.generate(nnx.state(model), _prompts(rng, lengths), np.arange(2), np.array([2, 2]), key)
        assert len(s._buffers) == 1
    kept = next(iter(s._buffers.values()))
    assert kept.k[0].shape[2] >= 12  # the 16-bucket's cache, the 8-bucket's was dropped
    s.release_buffers()
    assert not s._buffers


def test_a_released_row_cache_is_rebuilt_without_compiling(model):
    """The trainer releases the row cache after every step's sampling: rebuilding it must not
    compile anything (a fresh jax.jit of a new lambda compiled once per step)."""
    from dynamo_jax.compilation import CompileCounter

    s = Sampler(model, eos_ids=(EOS,), pad_id=PAD, spec=SPEC)
    rng = np.random.default_rng(0)
    prompts = _prompts(rng, [3, 5])
    s.generate(nnx.state(model), prompts, np.arange(2), np.array([2, 2]), jax.random.key(0))
    for step in range(2):
        s.release_buffers()
        with CompileCounter() as c:
            s.generate(nnx.state(model), prompts, np.arange(2), np.array([2, 2]), jax.random.key(1))
        assert c.count == 0, (step, c.count)
