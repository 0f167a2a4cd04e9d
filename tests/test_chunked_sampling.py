"""The trainer's row-chunked sampling: prompt groups packed into sampler calls of at most
max_rows rows give exactly the rows one call gives (same tokens, log-probs, group ids)."""

import jax
import numpy as np
import pytest

from dynamo_jax.buckets import BucketSpec
from dynamo_jax.models import ModelConfig, init_model
from dynamo_jax.sampling import Sampler
from dynamo_jax.trainer import generate_in_chunks, pack_prompt_chunks

CFG = ModelConfig(
    model_type="qwen2",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


def test_pack_prompt_chunks():
    chunks = pack_prompt_chunks(np.array([3, 5, 2, 6, 1, 0, 4]), 8)
    assert [c.tolist() for c in chunks] == [[0, 1], [2, 3], [4, 5, 6]]
    for c in chunks:
        assert np.array([3, 5, 2, 6, 1, 0, 4])[c].sum() <= 8
    assert [c.tolist() for c in pack_prompt_chunks(np.array([3, 5]), 0)] == [[0, 1]]
    with pytest.raises(ValueError, match="max_rows_per_call"):
        pack_prompt_chunks(np.array([3, 9]), 8)


def test_chunked_generation_equals_one_call():
    model = init_model(CFG, 0)
    rng = np.random.default_rng(0)
    lengths = [3, 12, 5, 7, 2, 9]  # two prompt-length buckets (8 and 16)
    prompts = [rng.integers(4, 64, size=n).tolist() for n in lengths]
    ids = np.arange(100, 106)
    sizes = np.array([4, 2, 6, 1, 3, 4])
    key = jax.random.key(7)
    kw = dict(temperature=1.0)

    def sampler(rows):
        spec = BucketSpec(
            prompt_len_buckets=(8, 16),
            row_buckets=(rows,),
            prompt_count_buckets=4,
            max_new_tokens=6,
        )
        return Sampler(model, eos_ids=(3,), pad_id=0, spec=spec)

    whole = generate_in_chunks(sampler(20), model, prompts, ids, sizes, key, 0, 0, **kw)
    chunked_sampler = sampler(8)
    chunked = generate_in_chunks(chunked_sampler, model, prompts, ids, sizes, key, 8, 0, **kw)
    assert chunked.num_rows == sizes.sum() and chunked.valid.all()
    # The chunks met two prompt-length buckets; no KV cache of either outlives the sampling
    # (kept, they would sit on the device through the train update).
    assert not chunked_sampler._buffers

    def by_row(r):
        rows = {}
        for i in np.flatnonzero(r.valid):
            p = r.prompt_tokens[i, : r.prompt_lengths[i]].tolist()
            rows[(int(r.group_id[i]), int(r.sample_index[i]))] = (
                p,
                r.response_tokens[i].tolist(),
                r.response_logp[i],
                int(r.prompt_id[i]),
            )
        return rows

    a, b = by_row(whole), by_row(chunked)
    assert a.keys() == b.keys() and len(a) == sizes.sum()
    for k in a:
        assert a[k][0] == b[k][0] == prompts[k[0]]  # the row's prompt, by its group id
        assert a[k][1] == b[k][1]
        assert a[k][3] == b[k][3] == ids[k[0]]
        np.testing.assert_allclose(a[k][2], b[k][2], atol=1e-5)


def test_cached_warm_start_must_match_the_config(tmp_path):
    import json

    from configs import arith_tiny
    from dynamo_jax.trainer import check_warm_start, warm_start_fingerprint

    c = arith_tiny.get_config()
    fp = warm_start_fingerprint(c)
    assert fp["sft.steps"] == c.sft.steps and fp["model.architecture.hidden_size"] == 128
    (tmp_path / "sft_summary.json").write_text(json.dumps({"fingerprint": fp}))
    check_warm_start(str(tmp_path), fp)  # same settings: fine
    c.seed, c.train.num_steps, c.model.remat = 5, 7, True  # RL-only fields do not matter
    check_warm_start(str(tmp_path), warm_start_fingerprint(c))
    c.sft.label_noise = 0.0
    c.model.architecture.hidden_size = 64
    with pytest.raises(ValueError) as e:
        check_warm_start(str(tmp_path), warm_start_fingerprint(c))
    assert "sft.label_noise: cached 0.3, now 0.0" in str(e.value)
    assert "model.architecture.hidden_size" in str(e.value) and "--workdir" in str(e.value)
    # With an early stop at sft.target_accuracy, how held-out accuracy is scored decides when
    # the warm start stopped: those settings are part of it (they were not).
    c = arith_tiny.get_config()
    assert c.sft.target_accuracy > 0
    (tmp_path / "sft_summary.json").write_text(
        json.dumps({"fingerprint": warm_start_fingerprint(c)})
    )
    for field, value in (
        ("eval.num_prompts", 20),
        ("sampling.temperature", 0.5),
        ("eval.greedy", True),
    ):
        d = arith_tiny.get_config()
        section, name = field.split(".")
        d[section][name] = value
        with pytest.raises(ValueError, match=rf"{field}: cached .*, now {value}"):
            check_warm_start(str(tmp_path), warm_start_fingerprint(d))
        d.sft.target_accuracy = 0.0  # no early stop: these settings do not matter
        assert field not in warm_start_fingerprint(d)
    # A cache made before these fields were recorded is still accepted.
    old = {
        k: v
        for k, v in warm_start_fingerprint(c).items()
        if not k.startswith(("eval.", "sampling."))
    }
    (tmp_path / "sft_summary.json").write_text(json.dumps({"fingerprint": old}))
    check_warm_start(str(tmp_path), warm_start_fingerprint(c))


def test_new_allocations_packed_into_calls_do_not_recompile():
    """The number of prompts per call depends on the allocation (8 groups of 2 fit one call of
    32 rows, groups of 14 two per call); the run's sampler gives every call the same prompt
    slots, so a new allocation compiles nothing new."""
    from types import SimpleNamespace

    from dynamo_jax import config as config_lib
    from dynamo_jax.trainer import rollout_sampler

    config = config_lib.get_default_config()
    config.prompts_per_step, config.rollouts_per_prompt = 16, 8
    config.allocation.n_low, config.allocation.n_high = 2, 14
    config.sampling.max_rows_per_call = 32
    config.buckets.prompt_len = (8,)
    tokenizer = SimpleNamespace(eos_ids=(3,), pad_id=0, vocab_size=CFG.vocab_size)
    task = SimpleNamespace(tokenizer=tokenizer, max_new_tokens=4)
    model = init_model(CFG, 0)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(4, 64, size=5).tolist() for _ in range(16)]
    sampler = rollout_sampler(config, model, task)
    counts = []
    for sizes in ([8] * 16, [2] * 8 + [14] * 8, [14] * 8 + [2] * 8, [2] * 16):
        sizes = np.array(sizes)
        generate_in_chunks(sampler, model, prompts, np.arange(16), sizes, jax.random.key(0), 32, 0)
        counts.append(dict(sampler.num_compilations()))
    assert counts[0] == counts[-1], counts
