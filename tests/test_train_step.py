import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamo_jax import config as config_lib
from dynamo_jax import sharding as shd
from dynamo_jax import train_step as ts
from dynamo_jax.compilation import CompileCounter
from dynamo_jax.models import ModelConfig, init_model

R, P, M, GROUPS = 16, 6, 5, 4
MODEL_CFG = ModelConfig.from_hf_dict(
    dict(
        model_type="qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
)


def make_config(num_minibatches=2, micro_batch_rows=4, scope="micro_batch", **loss):
    cfg = config_lib.get_default_config()
    cfg.train.num_minibatches = num_minibatches
    cfg.train.micro_batch_rows = micro_batch_rows
    cfg.modulation.scope = scope
    cfg.optim.learning_rate = 1e-2
    cfg.optim.warmup_steps = 0
    cfg.optim.eps = 1e-3  # keeps Adam from amplifying round-off in near-zero gradients
    cfg.sampling.max_new_tokens = M
    for k, v in loss.items():
        cfg.loss[k] = v
    return cfg


def make_batch(seed=0, group_sizes=(3, 5, 2, 6)):
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, P + 1, R)
    prompts = np.where(np.arange(P)[None] < lens[:, None], rng.integers(1, 64, (R, P)), 0)
    resp = rng.integers(1, 64, (R, M))
    rmask = (np.arange(M)[None] < rng.integers(1, M + 1, R)[:, None]).astype(np.float32)
    b = ts.batch_from_rollouts(prompts, lens, resp, rmask, pad_id=0)
    b["rewards"] = rng.choice([-1.0, 1.0], R).astype(np.float32)
    b["group_ids"] = np.repeat(np.arange(GROUPS), group_sizes).astype(np.int32)
    b["valid"] = np.ones(R, bool)
    return b, (prompts, lens, resp)


def build(cfg, mesh=None):
    model = init_model(MODEL_CFG, 0, mesh=mesh)
    tx = ts.make_optimizer(cfg)
    graphdef, rest, state = ts.init_train_state(model, tx, with_reference=cfg.loss.kl_coef > 0)
    settings = ts.StepSettings.from_config(cfg, num_groups=GROUPS)
    kw = dict(state_shardings=ts.state_shardings(state))
    if mesh is not None:
        kw["batch_sharding"] = shd.batch_sharding(mesh)
    return model, ts.TrainStep(graphdef, rest, tx, settings, **kw), state


def run_update(step, state, batch):
    batch = dict(batch)
    batch["old_logp"] = np.asarray(step.logprobs(state.params, batch).logp)
    if state.ref_params is not None:
        batch["ref_logp"] = np.asarray(step.logprobs(state.ref_params, batch).logp)
    return step.update(state, batch, jax.random.key(1))


def test_logprobs_of_packed_batch_equal_direct_forward():
    cfg = make_config()
    model, step, state = build(cfg)
    batch, (prompts, lens, resp) = make_batch()
    stats = step.logprobs(state.params, batch)
    for r in np.argsort(lens)[[0, 1, -1]]:  # shortest and longest prompts (eager: slow)
        seq = np.concatenate([prompts[r, : lens[r]], resp[r]])
        logp_all = jax.nn.log_softmax(model(jnp.asarray(seq)[None])[0])
        want = logp_all[lens[r] - 1 + np.arange(M), resp[r]]
        np.testing.assert_allclose(stats.logp[r], want, atol=1e-5)


def test_micro_batch_accumulation_equals_one_big_batch():
    """With scope mini_batch and token_mean, 2 updates of 4 micro-batches each equal 2 updates of
    one 8-row micro-batch: the accumulation is exact, not an average of averages."""
    batch, _ = make_batch(1)
    results = []
    for micro in (2, 8):
        cfg = make_config(2, micro, scope="mini_batch")
        _, step, state = build(cfg)
        if "old_logp" not in batch:
            # One set of behaviour log-probs for both runs: `logprobs` runs micro_batch_rows
            # rows at a time, and a different chunking may round differently.
            batch["old_logp"] = np.asarray(step.logprobs(state.params, batch).logp)
        new_state, metrics = step.update(state, batch, jax.random.key(1))
        results.append((new_state, metrics))
    (s1, m1), (s2, m2) = results
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5, abs=1e-7)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-5)


def test_update_raises_logp_of_positive_rows():
    cfg = make_config(1, 16)
    cfg.modulation.comp = cfg.modulation.stab = False
    _, step, state = build(cfg)
    batch, _ = make_batch(2)
    before = np.asarray(step.logprobs(state.params, batch).logp)
    new_state, metrics = run_update(step, state, batch)
    after = np.asarray(step.logprobs(new_state.params, batch).logp)
    m = batch["response_mask"] > 0
    pos = (batch["rewards"] > 0)[:, None] & m
    neg = (batch["rewards"] < 0)[:, None] & m
    assert (after - before)[pos].mean() > 0 > (after - before)[neg].mean()
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["grad_norm"]))


def test_new_allocations_do_not_recompile():
    _, step, state = build(make_config())
    batch, _ = make_batch(0, (3, 5, 2, 6))
    with CompileCounter() as first:
        state, _ = run_update(step, state, batch)
    assert first.count >= 2  # the counter sees compilations (logprobs and update)
    with CompileCounter() as later:
        for i, sizes in enumerate([(4, 4, 4, 4), (1, 1, 1, 13), (8, 2, 3, 3)]):
            batch, _ = make_batch(i + 1, sizes)
            state, _ = run_update(step, state, batch)
    assert later.count == 0, later.by_function


def test_kl_and_entropy_terms_run_and_padding_rows_are_ignored():
    cfg = make_config(kl_coef=0.1, entropy_coef=0.01)
    _, step, state = build(cfg)
    batch, _ = make_batch(3)
    state2, metrics = run_update(step, state, batch)
    assert "kl" in metrics and np.isfinite(float(metrics["kl"]))
    # padding rows with garbage rewards change nothing
    _, step_b, state_b = build(cfg)
    padded = dict(batch)
    padded["valid"] = batch["valid"].copy()
    padded["valid"][-2:] = False
    padded["group_ids"] = batch["group_ids"].copy()
    _, step_c, state_c = build(cfg)
    trimmed_rewards = padded["rewards"].copy()
    trimmed_rewards[-2:] = 100.0
    garbage = dict(padded, rewards=trimmed_rewards)
    s_b, _ = run_update(step_b, state_b, padded)
    s_c, _ = run_update(step_c, state_c, garbage)
    for a, b in zip(jax.tree.leaves(s_b.params), jax.tree.leaves(s_c.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_sharded_mesh_equals_single_device():
    """(data 2, fsdp 2, tensor 2) on 8 simulated devices gives the same loss and parameters as
    one device. Tolerance: loss 5e-4 relative, parameters 1e-4 absolute (a step moves them by up
    to 2e-2). Float32 reduction order differs across devices, and a random-init model has nearly
    uniform entropies (all close to log V), so beta_comp's (H_max - H) / (H_max - H_min) divides
    round-off by a tiny span; with comp off the losses agree to 2e-6 relative."""
    batch, _ = make_batch(4)
    cfg = make_config()
    _, step1, state1 = build(cfg)
    new1, m1 = run_update(step1, state1, batch)
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    _, step8, state8 = build(cfg, mesh)
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state8.params))
    new8, m8 = run_update(step8, state8, batch)
    assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), rel=5e-4)
    assert float(m8["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=5e-4)
    for a, b in zip(jax.tree.leaves(new8.params), jax.tree.leaves(new1.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    # the update keeps every parameter's sharding (pinned out_shardings)
    for before, after in zip(
        jax.tree.leaves(state8.params), jax.tree.leaves(new8.params), strict=True
    ):
        assert after.sharding.is_equivalent_to(before.sharding, before.ndim)


@pytest.mark.parametrize("micro_batch_rows", [16, 4])
def test_on_policy_update_without_old_logp_equals_the_separate_pass(micro_batch_rows):
    """With one optimiser update per step the behaviour policy is the parameters the gradient is
    taken at: leaving "old_logp" out (the update takes it from its own forward) gives the same
    update as passing the separate no-grad pass's values, for every micro-batch split."""
    cfg = make_config(1, micro_batch_rows)
    cfg.loss.eps_low = cfg.loss.eps_high = 0.05  # a clip an off-by-one-policy ratio would hit
    batch, _ = make_batch(3)
    results = []
    for with_old in (True, False):
        _, step, state = build(cfg)
        b = dict(batch)
        if with_old:
            b["old_logp"] = np.asarray(step.logprobs(state.params, b).logp)
        results.append(step.update(state, b, jax.random.key(1)))
    (s1, m1), (s2, m2) = results
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert float(m2["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
    for k in ("loss", "grad_norm", "beta_comp_pos_mean", "beta_stab_mean", "xi_max"):
        assert float(m2[k]) == pytest.approx(float(m1[k]), rel=1e-5, abs=1e-7), k


def test_update_without_old_logp_needs_one_minibatch():
    _, step, state = build(make_config(2, 4))
    batch, _ = make_batch(0)
    with pytest.raises(ValueError, match="num_minibatches"):
        step.update(state, batch, jax.random.key(1))


def test_on_policy_update_on_a_sharded_mesh_equals_single_device():
    """The on-policy path (no "old_logp" in the batch) on (data 2, fsdp 2, tensor 2): the same
    update as on one device, with the tolerances of test_sharded_mesh_equals_single_device."""
    batch, _ = make_batch(5)
    cfg = make_config(1, 8)
    results = []
    for mesh in (None, shd.make_mesh(data=2, fsdp=2, tensor=2)):
        _, step, state = build(cfg, mesh)
        results.append(step.update(state, dict(batch), jax.random.key(1)))
    (s1, m1), (s8, m8) = results
    assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), rel=5e-4)
    assert float(m8["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
    for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


@pytest.mark.parametrize("entropy_shaping_k", [0.0, 0.4])
def test_mini_batch_scope_of_one_micro_batch_equals_micro_batch_scope(entropy_shaping_k):
    """With one micro-batch per update both scopes hold the same tokens, so the updates must
    be equal, also when Entropy Advantages (SPEC 6) reshape the advantages before modulation:
    the mini_batch statistics must see the shaped advantages, as each micro-batch's loss does."""
    batch, _ = make_batch(4)
    results = []
    for scope in ("micro_batch", "mini_batch"):
        cfg = make_config(2, R // 2, scope=scope)
        cfg.advantage.entropy_shaping_k = entropy_shaping_k
        _, step, state = build(cfg)
        results.append(run_update(step, state, batch))
    (s1, m1), (s2, m2) = results
    for k in ("loss", "beta_stab_mean", "damped_frac", "xi_max"):
        assert float(m2[k]) == pytest.approx(float(m1[k]), rel=1e-5, abs=1e-7), k
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_kl_penalty_without_reference_log_probs_is_an_error():
    """kl_coef > 0 with no 'ref_logp' in the batch must not silently train without the KL."""
    _, step, state = build(make_config(1, 8, kl_coef=0.1))
    batch, _ = make_batch(0)
    with pytest.raises(ValueError, match=r"loss.kl_coef = 0.1 .*'ref_logp'"):
        step.update(state, batch, jax.random.key(1))


def test_modulation_metrics_are_means_over_the_update_tokens():
    """beta_comp_pos_mean, beta_stab_mean, damped_frac and xi_mean over an update of 2 x 2
    micro-batches, two of which have no A > 0 token (their groups' rewards are equal): the
    logged values are ratios of sums over all tokens (per micro-batch modulate_advantages,
    weighted by token counts). They used to be unweighted means of per-micro-batch means, which
    counted a micro-batch without A > 0 tokens as beta_comp 0 (below 1, impossible)."""
    from dynamo_jax import advantages as adv_lib
    from dynamo_jax import modulation

    cfg = make_config(2, 4)
    cfg.train.shuffle_rows = False  # micro-batch k = rows 4k..4k+3
    cfg.optim.learning_rate = 1e-9  # parameters ~unchanged: one forward gives the references
    _, step, state = build(cfg)
    batch, _ = make_batch(5, group_sizes=(4, 4, 4, 4))
    batch["rewards"] = np.array(
        [1, -1, 1, -1, -1, -1, -1, -1, 1, 1, -1, -1, 1, 1, 1, 1], np.float32
    )
    stats = step.logprobs(state.params, batch)
    batch["old_logp"] = np.asarray(stats.logp)
    adv = adv_lib.group_advantages(
        jnp.asarray(batch["rewards"]),
        jnp.asarray(batch["group_ids"]),
        jnp.asarray(batch["valid"]),
        4,
        "grpo",
    )
    sums = dict.fromkeys(("bc", "pos", "bs", "damped", "xi", "tokens"), 0.0)
    for k in range(4):
        r = slice(4 * k, 4 * k + 4)
        _, aux = modulation.modulate_advantages(
            adv[r],
            stats.entropy[r],
            stats.logp[r],
            jnp.asarray(batch["old_logp"][r]),
            jnp.asarray(batch["response_mask"][r]),
        )
        for key, name in (
            ("bc", "beta_comp_pos_sum"),
            ("pos", "pos_tokens"),
            ("bs", "beta_stab_sum"),
            ("damped", "damped_tokens"),
            ("xi", "xi_sum"),
            ("tokens", "valid_tokens"),
        ):
            sums[key] += float(aux[name])
    assert sums["pos"] > 0
    _, metrics = step.update(state, batch, jax.random.key(0))
    assert float(metrics["beta_comp_pos_mean"]) >= 1.0
    np.testing.assert_allclose(
        float(metrics["beta_comp_pos_mean"]), sums["bc"] / sums["pos"], rtol=1e-4
    )
    for name, key in (("beta_stab_mean", "bs"), ("damped_frac", "damped"), ("xi_mean", "xi")):
        np.testing.assert_allclose(
            float(metrics[name]), sums[key] / sums["tokens"], rtol=1e-4, atol=1e-7, err_msg=name
        )
