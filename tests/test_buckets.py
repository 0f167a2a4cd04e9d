"""Bucket choice and sampling plans: invariants under random allocations (hypothesis)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_jax.buckets import BucketSpec, choose, choose_multiple, pad_prompts, plan

SPEC = BucketSpec(
    prompt_len_buckets=(32, 64, 128), row_buckets=64, prompt_count_buckets=(4, 8, 16, 32, 64)
)


def test_choose():
    assert choose(1, (32, 64)) == 32
    assert choose(32, (64, 32)) == 32
    assert choose(33, (32, 64)) == 64
    with pytest.raises(ValueError, match=r"prompt length 65 .*largest is 64"):
        choose(65, (32, 64), "prompt length")
    assert choose_multiple(0, 64) == 64
    assert choose_multiple(65, 64) == 128
    assert choose_multiple(5, (4, 8, 16)) == 8
    assert choose_multiple(5, (4, 6, 16), multiple_of=4) == 8  # 6 rounded up to the mesh
    with pytest.raises(ValueError, match="largest is 16"):
        choose_multiple(17, (4, 8, 16))


def test_spec_validation():
    with pytest.raises(ValueError):
        BucketSpec(prompt_len_buckets=())
    with pytest.raises(ValueError):
        BucketSpec(row_buckets=0)
    with pytest.raises(ValueError):
        BucketSpec(max_new_tokens=0)


@st.composite
def allocations(draw):
    n = draw(st.integers(1, 40))
    sizes = draw(st.lists(st.integers(0, 24), min_size=n, max_size=n))
    lengths = draw(st.lists(st.integers(1, 128), min_size=n, max_size=n))
    ids = draw(st.lists(st.integers(-(2**62), 2**62), min_size=n, max_size=n))
    offsets = draw(st.one_of(st.none(), st.lists(st.integers(0, 100), min_size=n, max_size=n)))
    multiple = draw(st.sampled_from([1, 2, 4, 8]))
    return ids, lengths, sizes, offsets, multiple


@settings(max_examples=200, deadline=None)
@given(allocations())
def test_plan_invariants(alloc):
    ids, lengths, sizes, offsets, multiple = alloc
    p = plan(ids, lengths, sizes, SPEC, sample_offsets=offsets, multiple_of=multiple)
    n, total = len(ids), sum(sizes)
    r = p.num_rows
    # Static dims: smallest buckets that fit, divisible by the mesh batch shards.
    assert p.prompt_len == min(b for b in SPEC.prompt_len_buckets if b >= max(lengths))
    assert r >= max(total, 1) and r % 64 == 0 and r % multiple == 0 and r - 64 < max(total, 1)
    assert p.num_prompt_slots >= n and p.num_prompt_slots % multiple == 0
    assert p.static_dims == (p.num_prompt_slots, p.prompt_len, r, SPEC.max_new_tokens)
    assert (p.num_prompts, p.num_valid_rows) == (n, total)
    # Shapes and dtypes never depend on the data.
    for a, dtype in [
        (p.row_to_prompt, np.int32),
        (p.sample_index, np.int32),
        (p.group_id, np.int32),
        (p.prompt_id, np.int64),
        (p.valid, np.bool_),
    ]:
        assert a.shape == (r,) and a.dtype == dtype
    # Real rows first, padding rows after: invalid, in range, prompt id -1.
    np.testing.assert_array_equal(p.valid, np.arange(r) < total)
    assert (p.row_to_prompt >= 0).all() and (p.row_to_prompt < p.num_prompt_slots).all()
    assert (p.prompt_id[total:] == -1).all() and (p.row_to_prompt[total:] == 0).all()
    # Each prompt's rows are contiguous, in prompt order, with sample indices offset + 0..n_i-1.
    off = np.zeros(n, np.int64) if offsets is None else np.asarray(offsets)
    v = p.valid
    np.testing.assert_array_equal(p.group_id[v], np.repeat(np.arange(n), sizes))
    np.testing.assert_array_equal(p.row_to_prompt[v], p.group_id[v])
    np.testing.assert_array_equal(p.prompt_id[v], np.repeat(np.asarray(ids, np.int64), sizes))
    expected = np.concatenate(
        [o + np.arange(s) for o, s in zip(off, sizes, strict=True)] + [np.zeros(0)]
    )
    np.testing.assert_array_equal(p.sample_index[v], expected)
    assert (p.group_id >= 0).all() and (p.group_id < n).all()
    np.testing.assert_array_equal(np.bincount(p.group_id[v], minlength=n), sizes)


def test_plan_errors():
    with pytest.raises(ValueError, match=r"prompt length 129 .*largest is 128"):
        plan([1, 2], [10, 129], [1, 1], SPEC)
    with pytest.raises(ValueError, match=r"number of prompts 65 .*largest is 64"):
        plan(range(65), [3] * 65, [1] * 65, SPEC)
    with pytest.raises(ValueError, match="empty"):
        plan([1], [0], [1], SPEC)
    with pytest.raises(ValueError, match="same length"):
        plan([1, 2], [1], [1, 1], SPEC)
    with pytest.raises(ValueError, match=">= 0"):
        plan([1], [1], [-1], SPEC)
    with pytest.raises(ValueError):
        plan([], [], [], SPEC)


def test_pad_prompts():
    tokens, lengths = pad_prompts([[5, 6, 7], [8]], 4, pad_id=0, num_slots=3)
    np.testing.assert_array_equal(tokens, [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(lengths, [3, 1, 0])
    assert tokens.dtype == np.int32 and lengths.dtype == np.int32
    with pytest.raises(ValueError, match="more than prompt_len=2"):
        pad_prompts([[1, 2, 3]], 2, 0)
    with pytest.raises(ValueError, match="num_slots"):
        pad_prompts([[1], [2]], 2, 0, num_slots=1)
