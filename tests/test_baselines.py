"""SPEC 6 baselines: each option against a direct numpy transcription of its formula
(docs/BASELINES.md), the loss options' gradients, and every preset through a real train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamo_jax import advantages as adv_lib
from dynamo_jax import baselines, losses
from dynamo_jax import config as cfg_lib


def _batch(seed, rows=6, length=9):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.01, 4.0, (rows, length)).astype(np.float32)
    old = (logp + 0.3 * rng.normal(size=(rows, length))).astype(np.float32)
    entropy = rng.uniform(0.0, 3.0, (rows, length)).astype(np.float32)
    adv = rng.normal(size=rows).astype(np.float32)
    lengths = rng.integers(0, length + 1, rows)
    lengths[0] = length
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    return logp, old, entropy, adv, mask


def _np_cov(logp, adv_tok, mask):
    v = mask > 0
    return np.where(v, (logp - logp[v].mean()) * (adv_tok - adv_tok[v].mean()), 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_fork_tokens_match_numpy(seed):
    logp, old, entropy, adv, mask = _batch(seed)
    got = np.asarray(baselines.fork_token_mask(entropy, mask, 0.2))
    valid = mask > 0
    n = int(valid.sum())
    k = int(np.ceil(0.2 * n))
    # numpy: the k highest-entropy valid tokens
    flat = np.where(valid, entropy, -np.inf).ravel()
    top = np.argsort(-flat, kind="stable")[:k]
    want = np.zeros(flat.size)
    want[top] = 1.0
    np.testing.assert_array_equal(got.ravel(), want)
    assert got.sum() == k and np.all(got[~valid] == 0)
    # every chosen token has entropy >= every valid token left out
    assert entropy[got > 0].min() >= entropy[valid & (got == 0)].max()


def test_fork_tokens_empty_scope():
    got = baselines.fork_token_mask(jnp.ones((2, 3)), jnp.zeros((2, 3)), 0.2)
    assert float(jnp.sum(got)) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_entropy_advantages_match_numpy(seed):
    _, _, entropy, adv, _ = _batch(seed)
    adv[1] = 0.0
    got = np.asarray(baselines.entropy_shaped_advantages(adv, entropy, 0.4, 2.0))
    a = adv[:, None]
    want = a + np.minimum(0.4 * entropy, np.abs(a) / 2.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.all(got[1] == 0.0)  # a zero-variance group stays zero
    assert np.all(np.sign(got[adv < 0]) <= 0)  # the bonus cannot flip a negative advantage


@pytest.mark.parametrize("seed", range(5))
def test_kl_cov_selects_largest_covariance(seed):
    logp, _, _, adv, mask = _batch(seed, rows=16, length=32)
    for fraction in (2e-4, 0.05, 0.3):
        got = np.asarray(baselines.kl_cov_mask(logp, adv, mask, fraction=fraction))
        valid = mask > 0
        cov = _np_cov(logp, np.broadcast_to(adv[:, None], logp.shape), mask)
        k = max(int(np.floor(fraction * valid.sum())), 1)
        flat = np.where(valid, cov, -np.inf).ravel()
        want = np.zeros(flat.size)
        want[np.argsort(-flat, kind="stable")[:k]] = 1.0
        np.testing.assert_array_equal(got.ravel(), want)


def test_token_covariance_matches_numpy():
    logp, _, _, adv, mask = _batch(3)
    got = np.asarray(baselines.token_covariance(logp, adv, mask))
    want = _np_cov(logp, np.broadcast_to(adv[:, None], logp.shape), mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_clip_cov_draws_only_eligible_tokens(seed):
    logp, old, _, adv, mask = _batch(seed, rows=16, length=32)
    adv = 3.0 * adv  # spread the covariance so that some tokens fall in (1, 5)
    a = np.broadcast_to(adv[:, None], logp.shape)
    ratio = np.exp(np.clip(logp - old, -20, 20))
    clipped = -a * np.clip(ratio, 0.8, 1.28) > -a * ratio
    cov = _np_cov(logp, a, mask)
    eligible = (mask > 0) & ~clipped & (cov > 1.0) & (cov < 5.0)
    assert eligible.sum() >= 3, "test data should make some tokens eligible"
    for fraction, key in ((2e-4, 0), (0.01, 1), (1.0, 2)):
        got = np.asarray(
            baselines.clip_cov_mask(
                logp, old, adv, mask, jax.random.key(key), fraction=fraction, eps_high=0.28
            )
        )
        k = max(int(np.floor(fraction * (mask > 0).sum())), 1)
        assert got.sum() == min(k, eligible.sum())
        assert np.all(eligible[got > 0])
    # a different key draws a different subset (with many eligible and few drawn)
    draws = {
        tuple(
            np.flatnonzero(
                baselines.clip_cov_mask(logp, old, adv, mask, jax.random.key(i), fraction=0.003)
            )
        )
        for i in range(8)
    }
    assert len(draws) > 1


def test_w_reinforce_matches_numpy():
    rewards = np.array([1.0, -1.0, 1.0, -1.0, 1.0, 0.0], np.float32)
    valid = np.array([1, 1, 1, 1, 0, 1], bool)
    gid = np.array([0, 0, 1, 2, 2, 3], np.int32)
    got = np.asarray(
        adv_lib.group_advantages(rewards, gid, valid, 4, "w_reinforce", positive_weight=0.1)
    )
    want = np.where(valid, np.where(rewards > 0, 0.1 * rewards, rewards), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _np_loss_and_grad(logp, old, adv, mask, grad_mask=None, abs_kl_mask=None, coef=0.0, clip=True):
    """Token-mean loss and its gradient w.r.t. logp, transcribed with numpy."""
    a = np.broadcast_to(adv[:, None], logp.shape)
    r = np.exp(np.clip(logp - old, -20, 20))
    if clip:
        rc = np.clip(r, 0.8, 1.28)
        l1, l2 = -a * r, -a * rc
        loss = np.maximum(l1, l2)
        use_l1 = l1 >= l2
        dual = (a < 0) & (loss > -a * 10.0)
        loss = np.where(dual, -a * 10.0, loss)
        # d/dlogp: -a r where the unclipped branch is active and r is not clipped by dual clip
        in_range = (r > 0.8) & (r < 1.28)
        g = np.where(use_l1 | in_range, -a * r, 0.0)
        g = np.where(dual, 0.0, g)
    else:
        loss, g = -a * r, -a * r
    if grad_mask is not None:
        loss, g = loss * grad_mask, g * grad_mask
    if abs_kl_mask is not None:
        d = logp - old
        loss = loss + coef * abs_kl_mask * np.abs(d)
        g = g + coef * abs_kl_mask * np.sign(d)
    n = mask.sum()
    return (loss * mask).sum() / n, g * mask / n


@pytest.mark.parametrize("option", ["fork", "clip_cov", "kl_cov"])
def test_policy_loss_selection_options_match_numpy(option):
    logp, old, entropy, adv, mask = _batch(7, rows=8, length=16)
    sel = (np.random.default_rng(0).uniform(size=logp.shape) < 0.3).astype(np.float32)
    kw, np_kw = {}, {}
    if option in ("fork", "clip_cov"):
        kw = np_kw = {"grad_mask": sel}
    else:
        kw = {"abs_kl_mask": sel, "abs_kl_coef": 0.7, "clip": False}
        np_kw = {"abs_kl_mask": sel, "coef": 0.7, "clip": False}

    def f(lp):
        s, c, _ = losses.policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, **kw)
        return losses.loss_value(s, c)

    val, grad = jax.value_and_grad(f)(jnp.asarray(logp))
    want_val, want_grad = _np_loss_and_grad(logp, old, adv, mask, **np_kw)
    np.testing.assert_allclose(float(val), want_val, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)
    if option != "kl_cov":
        assert np.all(np.asarray(grad)[sel == 0] == 0.0)  # masked-out tokens carry no gradient


def test_presets_validate_and_set_fields():
    for name in baselines.PRESETS:
        c = cfg_lib.get_default_config()
        baselines.apply_preset(c, name)
        cfg_lib.validate(c)
    c = baselines.apply_preset(cfg_lib.get_default_config(), "kl_cov")
    assert c.loss.token_selection == "kl_cov" and c.allocation.mode == "uniform"
    assert not c.modulation.comp and not c.modulation.stab
    with pytest.raises(ValueError, match="fork_tokens"):
        baselines.apply_preset(cfg_lib.get_default_config(), "fork_token")


def test_token_counts_are_exact_where_float32_rounds_up():
    """0.3 * 50 is 15.000001 in float32: ceil gave 16 fork tokens, not 15. Every count is the
    exact ceil (fork tokens) / floor (Clip-Cov, KL-Cov) of fraction * n."""
    import fractions
    import math

    for fraction in (0.3, 0.2, 0.002, 2e-4, 0.7):
        exact = fractions.Fraction(fraction).limit_denominator(10**6)
        for n in (7, 49, 50, 90, 100, 1000, 1500, 5000):
            m = jnp.ones((1, n))
            h = jnp.arange(n, dtype=jnp.float32)[None]
            assert int(baselines.fork_token_mask(h, m, fraction).sum()) == math.ceil(exact * n)
            want = max(math.floor(exact * n), 1)
            assert int(baselines._selection_count(m, fraction)) == want, (fraction, n)


def test_cov_presets_follow_the_authors_recipes():
    """Clip-Cov's 7B recipe turns the PPO clip off (ratios 1 / 1) and detaches 2e-4 of the
    tokens; KL-Cov's penalises 2e-3 (2e-4 is the 32B value)."""
    c = baselines.apply_preset(cfg_lib.get_default_config(), "clip_cov")
    assert (c.loss.eps_low, c.loss.eps_high, c.loss.cov_fraction) == (1.0, 1.0, 2e-4)
    cfg_lib.validate(c)
    k = baselines.apply_preset(cfg_lib.get_default_config(), "kl_cov")
    assert k.loss.cov_fraction == 2e-3


def test_config_rejects_baseline_settings_that_undo_the_method():
    """kappa <= 1 lets Entropy Advantages turn a wrong answer's negative advantage into 0 or a
    positive one; W-REINFORCE with a reward of 0 for wrong answers has no negative samples."""
    c = cfg_lib.get_default_config()
    c.advantage.entropy_shaping_kappa = 0.5
    with pytest.raises(cfg_lib.ConfigError, match="entropy_shaping_kappa = 0.5 must be > 1"):
        cfg_lib.validate(c)
    c = baselines.apply_preset(cfg_lib.get_default_config(), "w_reinforce")
    c.advantage.incorrect_reward = 0.0
    with pytest.raises(cfg_lib.ConfigError, match="w_reinforce needs advantage.incorrect_reward"):
        cfg_lib.validate(c)


def test_config_rejects_bad_baseline_fields():
    c = cfg_lib.get_default_config()
    c.loss.fork_fraction = 0.0
    c.loss.clip_cov_low = 6.0
    with pytest.raises(cfg_lib.ConfigError) as e:
        cfg_lib.validate(c)
    assert "loss.fork_fraction" in str(e.value) and "loss.clip_cov_low" in str(e.value)


def test_every_preset_runs_a_train_step_and_changes_what_it_should():
    """Each preset through the real train step: finite metrics, and every baseline that changes
    the loss moves the parameters differently from its base (Clip-Higher), so no option is
    silently ignored by the wiring. (GRPO differs from Clip-Higher only in eps_high, which one
    small step need not reach; DynaMO is the default every other train-step test runs.)"""
    from test_train_step import build, make_batch, make_config, run_update

    batch, _ = make_batch(seed=3)
    params = {}
    names = [n for n in baselines.PRESETS if n not in ("dynamo", "grpo")]
    for name in names:
        cfg = make_config()
        baselines.apply_preset(cfg, name)
        cfg.loss.cov_fraction = 0.2  # a tiny batch: select a fifth of the tokens
        cfg.loss.clip_cov_low, cfg.loss.clip_cov_high = -10.0, 10.0
        cfg.advantage.entropy_shaping_k = 0.4 if name == "entropy_advantages" else 0.0
        cfg.loss.entropy_coef = 0.1 if name == "entropy_loss" else 0.0
        _, step, state = build(cfg)
        new_state, metrics = run_update(step, state, batch)
        m = jax.device_get(metrics)
        assert all(np.isfinite(v) for v in m.values()), (name, m)
        params[name] = np.concatenate(
            [np.ravel(x) for x in jax.tree.leaves(jax.device_get(new_state.params))]
        )
    base = params["clip_higher"]
    for name in names:
        if name != "clip_higher":
            assert np.max(np.abs(params[name] - base)) > 1e-6, name


def test_baselines_config_file_builds_each_preset():
    from ml_collections import config_flags  # noqa: F401  (the loader experiments.train uses)

    from configs import arith_baselines

    for name in baselines.PRESETS:
        c = arith_baselines.get_config(name)
        cfg_lib.validate(c)
        for path, value in baselines.PRESETS[name].items():
            section, field = path.split(".")
            assert c[section][field] == value
    assert arith_baselines.get_config("").modulation.comp  # no name: DynaMO


def test_train_cli_takes_a_preset_name_and_overrides(tmp_path):
    """`--config configs/arith_baselines.py:<name>` plus an override reaches validation (a bad
    value is rejected by name before anything heavy starts)."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "--config=configs/arith_baselines.py:kl_cov",
            f"--workdir={tmp_path}",
            "--config.loss.cov_fraction=2.0",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "loss.cov_fraction = 2.0 must be in (0, 1]" in proc.stderr + proc.stdout
    assert not (tmp_path / "sft_model").exists()
