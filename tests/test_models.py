"""Parity of dynamo_jax.models against transformers (PyTorch, CPU, float32, eager attention).

Tiny random models of each family are built with transformers, with *every* parameter
(biases and norm scales included) randomised so a mis-mapped tensor cannot hide behind an
all-zeros / all-ones init.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dynamo_jax import sharding as shd
from dynamo_jax.models import (
    KVCache,
    ModelConfig,
    UnsupportedConfigError,
    init_model,
    load_pretrained,
    save_pretrained,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 256
TOL = 1e-4
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

# name -> (config class, kwargs, save shard size)
FAMILIES = {
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=10000.0), "40KB"),
    "qwen2_untied": ("Qwen2Config", dict(tie_word_embeddings=False), None),
    # Theta, head_dim and original_max_position_embeddings chosen so the three llama3
    # frequency bands (kept, smoothed, divided by factor) are all present.
    "llama3": (
        "LlamaConfig",
        dict(
            rope_theta=10000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
        "40KB",
    ),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False), None),
}
MODEL_CLASSES = {
    "Qwen2Config": "Qwen2ForCausalLM",
    "LlamaConfig": "LlamaForCausalLM",
    "Qwen3Config": "Qwen3ForCausalLM",
}


def _randomise(model) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (folder, torch model) for every family, saved with transformers."""
    torch.manual_seed(0)
    out = {}
    for name, (config_cls, kwargs, shard) in FAMILIES.items():
        config = getattr(transformers, config_cls)(**_COMMON, **kwargs)
        model = getattr(transformers, MODEL_CLASSES[config_cls])(config)
        model.config._attn_implementation = "eager"
        model.eval()
        _randomise(model)
        path = tmp_path_factory.mktemp(name)
        if shard:
            model.save_pretrained(path, max_shard_size=shard)
            assert os.path.exists(path / "model.safetensors.index.json")
        else:
            model.save_pretrained(path)
            assert os.path.exists(path / "model.safetensors")
        out[name] = (path, model)
    return out


@pytest.fixture(scope="module")
def loaded(hf_models):
    return {name: load_pretrained(path) for name, (path, _) in hf_models.items()}


@nnx.jit
def _forward(model, ids):
    return model(ids)


@nnx.jit
def _decode(model, tokens, positions, cache, write_mask):
    return model.decode(tokens, positions, cache, write_mask=write_mask)


IDS = np.random.RandomState(0).randint(0, VOCAB, (2, 16))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_forward_matches_torch(name, hf_models, loaded):
    ours = np.asarray(_forward(loaded[name], jnp.asarray(IDS)))
    ref = _torch_logits(hf_models[name][1], IDS)
    assert ours.shape == (2, 16, VOCAB)
    assert np.abs(ref).max() > 1.0  # logits are not trivially small
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_tied", "llama3", "qwen3"])
def test_prefill_fanout_decode_matches_torch(name, hf_models, loaded):
    """Right-padded prompts of different lengths, prefill, fan out to rows, decode 1 by 1."""
    model, torch_model = loaded[name], hf_models[name][1]
    rng = np.random.RandomState(1)
    prompt_lens = [5, 9, 3]
    prompts = [rng.randint(0, VOCAB, n) for n in prompt_lens]
    pad_len, max_len, steps = 9, 16, 5
    ids = np.zeros((3, pad_len), np.int32)  # pad id 0; pads sit at positions >= len
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    positions = np.broadcast_to(np.arange(pad_len), (3, pad_len))

    cache = model.init_cache(3, max_len)
    assert cache.k.shape == (2, 3, 2, max_len, model.config.head_dim)
    logits, cache = _decode(model, jnp.asarray(ids), jnp.asarray(positions), cache, None)
    for b, p in enumerate(prompts):
        ref = _torch_logits(torch_model, p[None])[0]
        np.testing.assert_allclose(np.asarray(logits[b, : len(p)]), ref, atol=TOL, rtol=0)

    # Fan out: 5 rows sampling from 3 prompts, each row with its own continuation.
    row_to_prompt = np.array([0, 0, 1, 2, 2])
    cache = jax.tree.map(lambda x: x[:, row_to_prompt], cache)
    assert isinstance(cache, KVCache) and cache.k.shape[1] == 5
    lens = np.array(prompt_lens)[row_to_prompt]
    conts = rng.randint(0, VOCAB, (5, steps))
    got = []
    for s in range(steps):
        tok = jnp.asarray(conts[:, s : s + 1])
        pos = jnp.asarray((lens + s)[:, None])
        step_logits, cache = _decode(model, tok, pos, cache, None)
        got.append(np.asarray(step_logits[:, 0]))
    got = np.stack(got, axis=1)  # [rows, steps, V]
    for r, pr in enumerate(row_to_prompt):
        seq = np.concatenate([prompts[pr], conts[r]])
        ref = _torch_logits(torch_model, seq[None])[0, len(prompts[pr]) :]
        np.testing.assert_allclose(got[r], ref, atol=TOL, rtol=0)


def test_write_mask_keeps_pads_out_of_cache(loaded):
    model = loaded["qwen2_untied"]
    ids = jnp.asarray([[5, 6, 7, 0], [8, 9, 0, 0]])
    positions = jnp.broadcast_to(jnp.arange(4), (2, 4))
    valid = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    cache = model.init_cache(2, 8)
    _, cache = _decode(model, ids, positions, cache, valid)
    written = np.abs(np.asarray(cache.k)).sum(axis=(0, 2, 4)) > 0  # [B, S]
    np.testing.assert_array_equal(written[:, :4], np.asarray(valid))
    assert not written[:, 4:].any()


def test_attention_mask_and_positions_handle_left_padding(loaded, hf_models):
    model = loaded["qwen3"]
    row = IDS[1, :10]
    left = IDS.copy()  # [2, 16]; row 1 = 6 pads then the 10 tokens of `row`
    left[1] = np.concatenate([np.zeros(6, np.int64), row])
    mask = np.ones((2, 16), bool)
    mask[1, :6] = False
    positions = np.stack([np.arange(16), np.maximum(np.arange(16) - 6, 0)])

    @nnx.jit
    def masked(m, ids, pos, mask):
        return m(ids, pos, mask)

    padded = np.asarray(masked(model, jnp.asarray(left), jnp.asarray(positions), mask))
    plain = np.asarray(_forward(model, jnp.asarray(IDS)))
    np.testing.assert_allclose(padded[0], plain[0], atol=1e-5, rtol=0)
    row_alone = _torch_logits(hf_models["qwen3"][1], row[None])[0]
    np.testing.assert_allclose(padded[1, 6:], row_alone, atol=TOL, rtol=0)


@nnx.jit
def _hidden_head_logits(model, ids):
    return model.hidden_states(ids), model.lm_head_weight(), model(ids)


def test_hidden_states_and_lm_head(loaded):
    for name in ("qwen2_tied", "qwen2_untied"):
        hidden, w, logits = _hidden_head_logits(loaded[name], jnp.asarray(IDS))
        assert hidden.shape == (2, 16, 64)
        assert w.shape == (64, VOCAB)
        np.testing.assert_allclose(np.asarray(hidden @ w), np.asarray(logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_tied", "llama3"])
def test_save_roundtrip_loads_in_transformers(name, hf_models, loaded, tmp_path):
    model = loaded[name]
    out = tmp_path / "saved"
    save_pretrained(model, out, max_shard_size=60_000 if name == "llama3" else None)
    sharded = os.path.exists(out / "model.safetensors.index.json")
    assert sharded == (name == "llama3")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    ref = _torch_logits(hf_models[name][1], IDS)
    np.testing.assert_array_equal(_torch_logits(reloaded, IDS), ref)
    ours_again = load_pretrained(out)
    np.testing.assert_allclose(
        np.asarray(_forward(ours_again, jnp.asarray(IDS))), ref, atol=TOL, rtol=0
    )


@pytest.mark.parametrize(
    "mesh_shape,expected",
    [
        (
            (1, 2, 4),
            {  # 2 KV heads do not split over tensor=4: replicated on that axis.
                "embed": P("tensor", "fsdp"),
                "lm_head": P("fsdp", "tensor"),
                "layers.wq": P(None, "fsdp", "tensor", None),
                "layers.wk": P(None, "fsdp", None, None),
                "layers.bq": P(None, "tensor", None),
                "layers.wo": P(None, "tensor", None, "fsdp"),
                "layers.w_gate": P(None, "fsdp", "tensor"),
                "layers.w_down": P(None, "tensor", "fsdp"),
                "layers.attn_norm": P(None, None),
            },
        ),
        (
            (2, 2, 2),
            {
                "embed": P("tensor", "fsdp"),
                "layers.wk": P(None, "fsdp", "tensor", None),
                "layers.bk": P(None, "tensor", None),
                "layers.w_up": P(None, "fsdp", "tensor"),
                "final_norm": P(None),
            },
        ),
    ],
)
def test_load_on_mesh(mesh_shape, expected, hf_models, loaded):
    mesh = shd.make_mesh(*mesh_shape)
    model = load_pretrained(hf_models["qwen2_untied"][0], mesh=mesh)
    state = dict(
        (".".join(str(k) for k in path), v) for path, v in nnx.to_flat_state(nnx.state(model))
    )
    for name, spec in expected.items():
        sharding = state[name].get_value().sharding
        assert sharding.mesh.shape == mesh.shape
        assert sharding.spec == spec, name
    ids = jax.device_put(jnp.asarray(np.concatenate([IDS, IDS[::-1]])), shd.batch_sharding(mesh))
    sharded_logits = np.asarray(_forward(model, ids))
    single = np.asarray(
        _forward(loaded["qwen2_untied"], jnp.asarray(np.concatenate([IDS, IDS[::-1]])))
    )
    np.testing.assert_allclose(sharded_logits, single, atol=1e-5, rtol=0)


def test_decode_on_mesh_matches_single_device(hf_models, loaded):
    mesh = shd.make_mesh(2, 2, 2)
    model = load_pretrained(hf_models["qwen3"][0], mesh=mesh)
    ids = jnp.asarray(IDS[:, :9].repeat(2, axis=0))  # [4, 9]
    positions = jnp.broadcast_to(jnp.arange(9), (4, 9))
    expected = NamedSharding(mesh, P(None, ("data", "fsdp"), "tensor", None, None))
    cache = model.init_cache(4, 16)
    assert cache.k.sharding.is_equivalent_to(expected, 5)
    logits, cache = _decode(model, ids, positions, cache, None)
    assert cache.k.sharding.is_equivalent_to(expected, 5)
    single, _ = _decode(loaded["qwen3"], ids, positions, loaded["qwen3"].init_cache(4, 16), None)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(single), atol=1e-5, rtol=0)


def test_bf16_safetensors(hf_models, tmp_path):
    torch_model = hf_models["qwen2_untied"][1]
    bf16 = transformers.Qwen2ForCausalLM(torch_model.config).eval()
    bf16.load_state_dict(torch_model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    bf16.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"

    model = load_pretrained(tmp_path)  # float32 params from bf16 tensors, exact upcast
    ref_w = bf16.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    wq = np.asarray(model.layers.wq.get_value()[1])  # [E, H, D]
    np.testing.assert_array_equal(wq.transpose(1, 2, 0).reshape(-1, 64), ref_w)
    # Reference: transformers' own float32 load of the bf16 folder. (bf16.float() would not do:
    # .to(bfloat16) also rounded the RoPE inv_freq buffer.)
    upcast = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ref = _torch_logits(upcast, IDS)
    np.testing.assert_allclose(np.asarray(_forward(model, jnp.asarray(IDS))), ref, atol=TOL)

    # Saving as bf16 round-trips exactly (the values are bf16-representable).
    save_pretrained(model, tmp_path / "resaved", dtype=jnp.bfloat16)
    with open(tmp_path / "resaved" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    again = load_pretrained(tmp_path / "resaved")
    np.testing.assert_array_equal(
        np.asarray(again.layers.wq.get_value()), np.asarray(model.layers.wq.get_value())
    )

    # bfloat16 compute on bfloat16 weights stays close to the float32 reference.
    low = load_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert low.layers.wq.get_value().dtype == jnp.bfloat16
    out = np.asarray(_forward(low, jnp.asarray(IDS)))
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_bf16_compute_with_f32_master_weights(loaded, hf_models):
    path = hf_models["llama3"][0]
    model = load_pretrained(path, dtype=jnp.bfloat16)
    assert model.layers.w_up.get_value().dtype == jnp.float32
    out = np.asarray(_forward(model, jnp.asarray(IDS)))
    ref = np.asarray(_forward(loaded["llama3"], jnp.asarray(IDS)))
    assert 0 < np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def _hf_dict(**overrides):
    d = dict(
        model_type="qwen2",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    d.update(overrides)
    return d


def test_config_parsing_and_errors():
    c = ModelConfig.from_hf_dict(_hf_dict())
    assert (c.qkv_bias, c.o_bias, c.qk_norm, c.head_dim, c.rope_scaling) == (
        True,
        False,
        False,
        8,
        None,
    )
    # transformers<5 layout: rope_theta + rope_scaling with the old "type" key.
    old = ModelConfig.from_hf_dict(
        _hf_dict(
            model_type="llama",
            rope_theta=500000.0,
            rope_scaling=dict(
                type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        )
    )
    assert old.rope_theta == 500000.0 and dict(old.rope_scaling)["factor"] == 8.0
    assert hash(old) == hash(ModelConfig.from_hf_dict(old.to_hf_dict()))
    assert old == ModelConfig.from_hf_dict(old.to_hf_dict())

    with pytest.raises(UnsupportedConfigError, match="model_type='mistral'"):
        ModelConfig.from_hf_dict(_hf_dict(model_type="mistral"))
    with pytest.raises(UnsupportedConfigError, match=r"rope_scaling\.rope_type='yarn'"):
        ModelConfig.from_hf_dict(_hf_dict(rope_scaling=dict(rope_type="yarn", factor=4.0)))
    with pytest.raises(UnsupportedConfigError, match=r"rope_parameters\.rope_type='linear'"):
        ModelConfig.from_hf_dict(_hf_dict(rope_parameters=dict(rope_type="linear", factor=2.0)))
    with pytest.raises(UnsupportedConfigError, match="use_sliding_window"):
        ModelConfig.from_hf_dict(_hf_dict(use_sliding_window=True))
    with pytest.raises(UnsupportedConfigError, match="hidden_act"):
        ModelConfig.from_hf_dict(_hf_dict(hidden_act="gelu"))
    with pytest.raises(UnsupportedConfigError, match="lacks num_attention_heads"):
        ModelConfig.from_hf_dict(
            {k: v for k, v in _hf_dict().items() if k != "num_attention_heads"}
        )
    with pytest.raises(UnsupportedConfigError, match="partial_rotary_factor=0.5"):
        ModelConfig.from_hf_dict(_hf_dict(model_type="llama", partial_rotary_factor=0.5))
    with pytest.raises(UnsupportedConfigError, match="partial_rotary_factor"):
        ModelConfig.from_hf_dict(
            _hf_dict(rope_parameters=dict(rope_type="default", partial_rotary_factor=0.5))
        )
    with pytest.raises(UnsupportedConfigError, match="needs at least one layer"):
        ModelConfig.from_hf_dict(_hf_dict(num_hidden_layers=0))
    d = _hf_dict()
    with pytest.raises(UnsupportedConfigError, match=r"hidden_size=\d+ / num_attention_heads=3"):
        ModelConfig.from_hf_dict({**d, "num_attention_heads": 3, "num_key_value_heads": 3})


def test_grad_with_remat_matches():
    config = ModelConfig.from_hf_dict(_hf_dict(model_type="qwen3", head_dim=8))
    model = init_model(config, 0)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 32, (4, 8)))

    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(ids), axis=-1))

    grads = nnx.jit(nnx.grad(loss))(model)
    model.remat = True  # static attribute: same weights, rematerialised layer scan
    remat_grads = nnx.jit(nnx.grad(loss))(model)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == 14 and all(np.abs(np.asarray(g)).max() > 0 for g in leaves)
    for a, b in zip(leaves, jax.tree.leaves(remat_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_layer_scan_and_layer_loop_agree(monkeypatch):
    """Models above UNROLL_MAX_LAYERS scan their layers; below, a Python loop: same numbers
    (forward, gradient, prefill + decode with a stacked cache), and a per-layer cache with
    layer_params decodes to the same logits and cache as the stacked one."""
    from dynamo_jax.models import transformer

    config = ModelConfig.from_hf_dict(_hf_dict(model_type="qwen3", head_dim=8, num_hidden_layers=2))
    model = init_model(config, 0)
    graphdef, state = nnx.split(model)
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, 32, (3, 8)))
    pos = jnp.broadcast_to(jnp.arange(8), (3, 8))
    step_ids, step_pos = jnp.asarray(rng.randint(0, 32, (3, 1))), jnp.full((3, 1), 8)

    def run(state):
        m = nnx.merge(graphdef, state)
        loss = lambda s: jnp.mean(jax.nn.logsumexp(nnx.merge(graphdef, s)(ids), -1))  # noqa: E731
        logits, cache = m.decode(ids, pos, m.init_cache(3, 12))
        step, cache = m.decode(step_ids, step_pos, cache)
        return m(ids), jax.grad(loss)(state), logits, step, cache

    loop = jax.jit(run)(state)  # 2 layers <= UNROLL_MAX_LAYERS: the Python loop
    monkeypatch.setattr(transformer, "UNROLL_MAX_LAYERS", 0)
    scan = jax.jit(lambda s: run(s))(state)  # a new jit: traced again, now with lax.scan
    for a, b in zip(jax.tree.leaves(loop), jax.tree.leaves(scan), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)

    @jax.jit
    def per_layer(state, cache):
        m = nnx.merge(graphdef, state)
        return m.decode(step_ids, step_pos, cache.unstacked(), layer_params=m.layer_params())

    _, _, _, _, stacked_cache = loop
    prefilled = jax.jit(lambda s: nnx.merge(graphdef, s).decode(ids, pos, model.init_cache(3, 12)))
    _, cache = prefilled(state)
    step, cache = per_layer(state, cache)
    assert not cache.is_stacked and len(cache.k) == 2 and cache.k[0].shape == (3, 1, 12, 8)
    assert cache.max_len == 12 and cache.batch == 3
    np.testing.assert_allclose(np.asarray(step), np.asarray(loop[3]), atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(cache.stacked()), jax.tree.leaves(stacked_cache), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_decode_weights_cast_once_to_the_compute_dtype():
    """With float32 master weights and bfloat16 compute, layer_params() and decode_head() hand a
    decode loop the weights already in the compute dtype (so the loop does not convert them at
    every step), and decoding with them gives the same logits and cache as the plain call."""
    config = ModelConfig.from_hf_dict(_hf_dict(model_type="qwen2", head_dim=8, num_hidden_layers=2))
    model = init_model(config, 0, dtype=jnp.bfloat16)
    assert model.layers.wq.get_value().dtype == jnp.float32
    layers, head = model.layer_params(), model.decode_head()
    assert {a.dtype for layer in layers for a in layer.values()} == {jnp.dtype(jnp.bfloat16)}
    assert head.dtype == jnp.bfloat16 and head.shape == (config.hidden_size, config.vocab_size)
    graphdef, state = nnx.split(model)
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, 32, (3, 8)))
    pos = jnp.broadcast_to(jnp.arange(8), (3, 8))
    step_ids, step_pos = jnp.asarray(rng.randint(0, 32, (3, 1))), jnp.full((3, 1), 8)

    @jax.jit
    def both(state):
        m = nnx.merge(graphdef, state)
        _, cache = m.decode(ids, pos, m.init_cache(3, 12))
        plain = m.decode(step_ids, step_pos, cache.unstacked())
        h, c = m.decode(
            step_ids, step_pos, cache.unstacked(), layer_params=m.layer_params(), return_hidden=True
        )
        return plain, (m.logits_from_hidden(h, m.decode_head()), c)

    (logits, cache), (logits_cast, cache_cast) = both(state)
    assert logits.dtype == jnp.float32 and cache.k[0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(logits_cast), np.asarray(logits))
    for a, b in zip(jax.tree.leaves(cache_cast), jax.tree.leaves(cache), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
