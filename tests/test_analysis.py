"""dynamo_jax.analysis: statistics, the controlled allocation experiment against its closed
form, variants, sweep bookkeeping (resume, failures), metric readers and a tiny end-to-end run
of the covariance and entropy-change experiments."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import scipy.stats
from tiny_runs import TINY_ARITH

from dynamo_jax import analysis as A
from dynamo_jax import config as config_lib

# ------------------------------------------------------------------ statistics


def test_spearman_hand_cases():
    assert A.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert A.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert A.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(A.spearman([1, 1, 1], [1, 2, 3]))
    np.testing.assert_allclose(A.rankdata([10, 20, 20, 5]), [2, 3.5, 3.5, 1])


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 6, 50).astype(float)  # many ties
        y = x + rng.normal(0, 2, 50)
        y[:10] = 1.0
        assert A.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)


# ------------------------------------------------------------------ controlled allocation


def test_bandit_variance_matches_monte_carlo():
    pi = A.bandit_policy(0.3, 4)
    g = A.bandit_gradients(pi)
    # E[g] = grad of E[R] = 2 pi_0 - 1 w.r.t. the logits
    np.testing.assert_allclose(pi @ g, 2 * 0.3 * (np.eye(4)[0] - pi), atol=1e-12)
    rng = np.random.default_rng(1)
    samples = g[rng.choice(4, 200_000, p=pi)]
    mc = np.sum(samples.var(axis=0))
    assert mc == pytest.approx(A.bandit_gradient_variance(pi), rel=0.02)
    assert A.bandit_gradient_variance(A.bandit_policy(1.0, 4)) == pytest.approx(0.0, abs=1e-15)
    assert A.bandit_gradient_variance(A.bandit_policy(0.0, 4)) == pytest.approx(0.0, abs=1e-15)


def test_controlled_empirical_variance_matches_analytic():
    r = A.controlled_allocation_experiment(draws=3000, history_draws=5, seed=3)
    for name, row in r["allocations"].items():
        assert row["n"].sum() == r["budget"], name
        assert abs(row["empirical"] - row["analytic"]) < 4 * row["stderr"], (name, row)
    # The exact integer optimum is no worse than any other allocation; the continuous optimum
    # bounds it from below, the unbounded optimum bounds that.
    oracle = r["allocations"]["oracle"]["analytic"]
    assert all(oracle <= row["analytic"] + 1e-15 for row in r["allocations"].values())
    assert r["continuous_optimum"] <= oracle + 1e-15
    assert r["unbounded_optimum"] <= r["continuous_optimum"] + 1e-15


def test_variance_allocation_beats_uniform_where_it_must():
    # Half the prompts are always or never solved (zero gradient variance), the rest are
    # identical: any sigma-aware allocation moves rollouts to the uncertain half.
    p = [0.0] * 4 + [1.0] * 4 + [0.5] * 8
    r = A.controlled_allocation_experiment(p, history=64, draws=3000, history_draws=5, seed=0)
    rows = r["allocations"]
    uni = rows["uniform"]
    for name in ("variance", "variance_sqrt", "oracle"):
        assert rows[name]["n"][:8].tolist() == [r["n_low"]] * 8, name
        assert rows[name]["analytic"] < 0.7 * uni["analytic"], name
        gap = uni["empirical"] - rows[name]["empirical"]
        assert gap > 4 * np.hypot(uni["stderr"], rows[name]["stderr"]), name
    assert "| uniform |" in A.controlled_table(r)


def test_estimator_variance_formula():
    assert A.estimator_variance([1.0, 4.0], [1, 2]) == pytest.approx((1 + 2) / 4)


# ------------------------------------------------------------------ entropy-change formula


def test_vocab_entropy_change_is_first_order_exact_on_a_tabular_softmax():
    import jax.numpy as jnp

    from dynamo_jax import modulation

    rng = np.random.default_rng(0)
    for _ in range(5):
        logits = rng.normal(0, 2, 7)
        a, adv, lr = int(rng.integers(7)), float(rng.choice([-1.0, 1.0])), 1e-4
        est, exact = A.tabular_entropy_change(logits, a, adv, lr)
        assert est == pytest.approx(exact, rel=1e-2, abs=1e-9)
        # The library's estimate (on-policy, r = 1) is the same quantity divided by lr.
        z = jnp.asarray(logits, jnp.float32)[None, None]
        logp = jnp.log(jnp.exp(z) / jnp.exp(z).sum())[..., a]
        pi = np.exp(logits - logits.max())
        pi /= pi.sum()
        h = jnp.asarray([[-np.sum(pi * np.log(pi))]], jnp.float32)
        dh = modulation.entropy_change(
            jnp.asarray([adv]),
            logp,
            logp,
            h,
            jnp.ones((1, 1)),
            expectation="vocab",
            expected_pi_lambda=modulation.vocab_expectation(z),
        )
        assert float(dh[0, 0]) * lr == pytest.approx(est, rel=1e-3, abs=1e-10)


# ------------------------------------------------------------------ variants and the sweep


def test_variants_validate_and_differ_as_documented():
    for v in A.DEFAULT_VARIANTS:
        c = A.variant_config(v, seed=2, steps=7)
        config_lib.validate(c)
        assert c.seed == 2 and c.train.num_steps == 7
    d, g = A.variant_config("dynamo"), A.variant_config("grpo")
    assert (d.allocation.mode, d.modulation.comp, d.modulation.stab) == ("variance", True, True)
    assert (g.allocation.mode, g.modulation.comp, g.modulation.stab) == ("uniform", False, False)
    assert (d.loss.eps_high, g.loss.eps_high) == (0.28, 0.2)
    for v in ("alloc_only", "modulation_only", "comp_only", "stab_only", "clip_higher"):
        assert A.variant_config(v).loss.eps_high == 0.28
    m = A.variant_config("comp_only")
    assert (m.allocation.mode, m.modulation.comp, m.modulation.stab) == ("uniform", True, False)
    with pytest.raises(ValueError, match="unknown variant"):
        A.variant_config("nope")


def test_flags_and_overrides_round_trip():
    o = A.parse_overrides(["a.b=false", "c=3", "d=0.5", "e=uniform"])
    assert o == {"a.b": False, "c": 3, "d": 0.5, "e": "uniform"}
    flags = A.variant_flags({"modulation.comp": False, "loss.eps_high": 0.2, "x": (16,)})
    assert flags == [
        "--config.modulation.comp=false",
        "--config.loss.eps_high=0.2",
        "--config.x=(16,)",
    ]


def test_worker_env_is_single_threaded_and_drops_fake_devices():
    env = A.worker_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, cache_dir="/c")
    assert "device_count" not in env["XLA_FLAGS"]
    assert "--xla_cpu_multi_thread_eigen=false" in env["XLA_FLAGS"]
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert env["JAX_COMPILATION_CACHE_DIR"] == "/c"


def _fake_sft(out):
    for sub in ("sft_model", "tokenizer"):
        os.makedirs(out / "_sft" / sub)
    (out / "_sft" / "sft_model" / "config.json").write_text("{}")


def test_run_sweep_skips_finished_runs_and_survives_failures(tmp_path, monkeypatch):
    _fake_sft(tmp_path)
    # A stand-in trainer: fails for alloc_only, otherwise writes a finished summary.
    script = (
        "import json, os, sys; w = sys.argv[1]\n"
        "if 'alloc_only' in w: sys.exit(3)\n"
        "json.dump({'heldout_accuracy_after': 0.5, 'steps': 4}, open(os.path.join(w, "
        "'summary.json'), 'w')); print('trained', w)"
    )
    calls = []

    def fake_command(workdir, overrides, config_path=A.DEFAULT_CONFIG):
        calls.append(workdir)
        return [sys.executable, "-c", script, workdir]

    monkeypatch.setattr(A, "train_command", fake_command)
    variants = ("dynamo", "alloc_only", "grpo")
    status = A.run_sweep(str(tmp_path), variants, (0, 1), steps=4, jobs=2, log=lambda _: None)
    assert status["alloc_only/seed0"].startswith("failed (exit 3")
    assert status["dynamo/seed1"] == status["grpo/seed0"] == "done"
    assert os.path.exists(tmp_path / "grpo" / "seed1" / "sft_model" / "config.json")
    assert "trained" in (tmp_path / "dynamo" / "seed0" / "log.txt").read_text()
    calls.clear()
    status = A.run_sweep(str(tmp_path), variants, (0, 1), steps=4, jobs=1, log=lambda _: None)
    assert status["dynamo/seed0"] == "skipped"
    assert sorted(calls) == sorted(str(tmp_path / "alloc_only" / f"seed{s}") for s in (0, 1))
    # A different step count is a different sweep: nothing counts as finished.
    assert not A.run_is_done(str(tmp_path / "dynamo" / "seed0"), steps=5)


def test_run_sweep_stops_at_the_time_limit(tmp_path, monkeypatch):
    _fake_sft(tmp_path)
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(A, "train_command", lambda w, o, c=None: sleep)
    status = A.run_sweep(str(tmp_path), ("dynamo",), (0,), 4, max_seconds=1.5, log=lambda _: None)
    assert status["dynamo/seed0"] == "stopped"
    assert "time limit" in (tmp_path / "dynamo" / "seed0" / "log.txt").read_text()


# ------------------------------------------------------------------ reading runs


def _write_run(workdir, steps, offset, allocations=None):
    from dynamo_jax.metrics import MetricsWriter

    w = MetricsWriter(workdir, steps, progress=False)
    for s in range(steps):
        m = {"reward": s + offset, "zero_variance_frac": 0.5}
        if (s + 1) % 2 == 0:
            m["eval_accuracy"] = 0.1 * s + offset
        hist = {"allocation": allocations[s]} if allocations else None
        w.write(s, m, histograms=hist)
    w.close()
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({"heldout_accuracy_before": offset, "heldout_accuracy_after": 1.0}, f)


def test_load_sweep_aggregate_and_allocation_histograms(tmp_path):
    # TensorBoard's buckets separate the integers up to 10; 11 and 12 (or 15 and 16) share one
    # and are told apart by the histogram's sum and sum of squares.
    allocs = [np.array([4, 4, 8, 16, 16, 16]), np.array([5, 6, 7, 9, 11, 12])] * 2
    _write_run(str(tmp_path / "dynamo" / "seed0"), 4, 0.0, allocs)
    _write_run(str(tmp_path / "dynamo" / "seed1"), 4, 1.0)
    _write_run(str(tmp_path / "grpo" / "seed0"), 4, 0.0)
    os.makedirs(tmp_path / "_sft")
    sweep = A.load_sweep(str(tmp_path))
    assert sorted(sweep) == ["dynamo", "grpo"] and sorted(sweep["dynamo"]) == [0, 1]
    agg = A.aggregate(sweep["dynamo"], "reward")
    np.testing.assert_allclose(agg["x"], [1, 2, 3, 4])
    np.testing.assert_allclose(agg["mean"], [0.5, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(agg["std"], np.full(4, np.sqrt(0.5)))
    ev = A.aggregate(sweep["dynamo"], "eval_accuracy", rollouts_per_step=10, with_before=True)
    np.testing.assert_allclose(ev["x"], [0, 20, 40])
    np.testing.assert_allclose(ev["mean"], [0.5, 0.6, 0.8])
    hists = A.read_allocation_histograms(str(tmp_path / "dynamo" / "seed0"))
    assert sorted(hists) == [0, 1, 2, 3]
    for s in range(4):
        assert sorted(hists[s].tolist()) == sorted(allocs[s].tolist())
    # The TensorBoard path itself (runs whose metrics.jsonl lacks the exact lists): drop them.
    tb_only = tmp_path / "tb_only"
    shutil.copytree(tmp_path / "dynamo" / "seed0", tb_only)
    rows = [json.loads(line) for line in open(tb_only / "metrics.jsonl")]
    with open(tb_only / "metrics.jsonl", "w") as f:
        f.writelines(
            json.dumps({k: v for k, v in r.items() if k != "allocation"}) + "\n" for r in rows
        )
    decoded = A.read_allocation_histograms(str(tb_only))
    assert sorted(decoded) == [0, 1, 2, 3]
    for s in range(4):
        assert sorted(decoded[s].tolist()) == sorted(allocs[s].tolist())
    steps, mat = A.allocation_matrix(hists, 16)
    assert mat.shape == (4, 17) and mat[0, 16] == 3 and mat.sum() == 24
    # The exact path: a per-step "allocation" list in metrics.jsonl wins over TensorBoard.
    exact = tmp_path / "exact"
    os.makedirs(exact)
    with open(exact / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "allocation": [4, 16, 13]}) + "\n")
    assert A.read_allocation_histograms(str(exact))[0].tolist() == [4, 16, 13]
    out = tmp_path / "plots"
    for path in (
        A.plot_training_curves(sweep, str(out / "curves.png"), window=2),
        A.plot_accuracy_vs_rollouts(sweep, 10, str(out / "acc.png")),
        A.plot_zero_variance(sweep, str(out / "zv.png")),
        A.plot_allocation_histogram(hists, 16, str(out / "alloc.png")),
    ):
        assert os.path.getsize(path) > 1000


def test_allocation_heat_map_counts_steps_done_like_the_other_plots():
    """metrics.jsonl steps are 0-based; `series` (every other plot) puts step s at x = s + 1.
    The heat map's column for step index 0 must sit at x = 1, not 0."""
    hists = {s: np.array([4, 8, 12]) for s in range(3)}
    fig = A.plot_allocation_histogram(hists, 16)
    x0, x1, _, _ = fig.axes[0].images[0].get_extent()
    assert (x0, x1) == (0.5, 3.5)
    assert A.series([{"step": 0, "k": 1.0}], "k")[0].tolist() == [1.0]


def test_paired_difference_is_the_paired_t_test():
    rng = np.random.default_rng(0)
    ref = {s: float(v) for s, v in enumerate(rng.normal(0.45, 0.02, 6))}
    val = {s: ref[s] - 0.01 + float(rng.normal(0, 0.005)) for s in ref}
    val[9] = 0.9  # a seed the reference lacks: not paired, so ignored
    d = A.paired_difference(val, ref)
    seeds = sorted(ref)
    expected = scipy.stats.ttest_rel([val[s] for s in seeds], [ref[s] for s in seeds])
    assert d["n"] == 6
    assert d["t"] == pytest.approx(expected.statistic)
    assert d["p"] == pytest.approx(expected.pvalue)
    diffs = np.array([val[s] - ref[s] for s in seeds])
    assert d["mean"] == pytest.approx(diffs.mean())
    assert d["se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(6))
    assert d["below"] == int((diffs < 0).sum())
    one = A.paired_difference({0: 0.5}, {0: 0.4})
    assert one["mean"] == pytest.approx(0.1) and np.isnan(one["se"]) and np.isnan(one["p"])


def test_controlled_vs_history_agrees_with_the_main_table():
    """The curve at the table's history length is the same number as the table's "mean over
    histories" column (it used to average half as many histories), and both carry a Monte
    Carlo standard error."""
    r = A.controlled_allocation_experiment(history=16, draws=2)  # the defaults, as the report
    curves = A.controlled_vs_history(histories=(16,))
    uni = r["allocations"]["uniform"]["analytic"]
    for name in ("variance", "variance_sqrt", "official"):
        row = r["allocations"][name]
        assert curves[name][0] == pytest.approx(row["analytic_mean_over_histories"] / uni)
        assert curves["se"][name][0] == pytest.approx(row["analytic_se_over_histories"] / uni)
        assert row["analytic_se_over_histories"] > 0
    assert "+- " in A.controlled_vs_history_table(curves)
    assert A.controlled_vs_history()["history"].tolist() == [4, 8, 16, 32, 64, 256]


def test_smooth():
    np.testing.assert_allclose(A.smooth(np.array([1.0, 3.0, 5.0]), 2), [1.0, 2.0, 4.0])


# ------------------------------------------------------------------ embedded-task experiments

TINY = {
    **TINY_ARITH,
    "model.architecture.num_hidden_layers": 1,
    "data.num_train": 64,
    "data.num_heldout": 16,
    "eval.num_prompts": 16,
    "sft.steps": 10,
    "sft.num_examples": 200,
    "sft.eval_every": 1000,
    "train.micro_batch_rows": 16,
}


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sft"))
    config = A.variant_config("dynamo", 0, 2, TINY)
    return A.load_policy(workdir, config, require_cached=False)  # runs the tiny warm start


def test_pg_covariance_experiment_runs_and_is_consistent(tiny_policy):
    r = A.pg_covariance_experiment(tiny_policy, draws=3, history=6)
    assert set(r["modes"]) == set(A.PG_MODES)
    for name, row in r["modes"].items():
        assert row["n"].sum() == r["budget"], name
        for e in A.ESTIMATORS:
            assert np.isfinite(row[e]["trace"]) and row[e]["trace"] >= 0
        assert 0.0 <= row["zero_variance_share"] <= 1.0
    assert (r["modes"]["uniform"]["n"] == 4).all()
    assert "| uniform |" in A.pg_covariance_table(r)


def test_report_measures_at_a_run_checkpoint(tiny_policy, tmp_path, monkeypatch):
    """`experiments.report --policy_run`: (i) and (iv) at the parameters a run saved (its latest
    step by default, or the one asked for), given as a relative path; a missing step is named
    with the saved ones."""
    import jax

    from dynamo_jax.checkpoint import RunCheckpointer
    from experiments import report

    saved = {}
    with_steps = RunCheckpointer(tmp_path / "run" / "checkpoints")
    for step in (3, 5):
        saved[step] = jax.tree.map(lambda x, s=step: x + s, tiny_policy.params)
        with_steps.save(step, {"params": saved[step]}, {"step": step})
    with_steps.close()
    monkeypatch.chdir(tmp_path)
    for asked, step in ((-1, 5), (3, 3)):
        policy, got = report.policy_at_checkpoint(tiny_policy, "run", asked, tiny_policy.config)
        assert got == step and policy.sampler is tiny_policy.sampler
        for a, b in zip(jax.tree.leaves(policy.params), jax.tree.leaves(saved[step]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(SystemExit, match=r"--policy_step 4: no such checkpoint .*\[3, 5\]"):
        report.policy_at_checkpoint(tiny_policy, "run", 4, tiny_policy.config)


def test_entropy_change_experiment_runs(tiny_policy):
    r = A.entropy_change_experiment(tiny_policy, batches=1, learning_rates=(1e-2,))
    row = r["by_lr"][1e-2]
    if row["tokens"] > 1:
        assert row["mean_abs_measured"] > 0
        for v in (*row["spearman_signed"].values(), *row["spearman_abs"].values()):
            assert np.isnan(v) or -1.0 <= v <= 1.0
    assert "sgd" in A.entropy_change_table(r)


def test_zero_variance_share():
    correct = np.array([1, 1, 0, 1, 0, 0, 1], bool)
    gid = np.array([0, 0, 1, 1, 2, 2, 3])
    assert A.zero_variance_share(correct, gid, np.ones(7, bool)) == pytest.approx(5 / 7)


# ------------------------------------------------------------------ command lines


def test_report_cli_controlled_part(tmp_path):
    from experiments import report

    assert (
        report.main(
            ["--out", str(tmp_path / "none"), "--dest", str(tmp_path), "--only", "controlled"]
        )
        == 0
    )
    assert (tmp_path / "controlled_allocation.png").exists()
    assert "| oracle |" in (tmp_path / "report_controlled.md").read_text()
    data = json.load(open(tmp_path / "results.json"))
    assert data["controlled_vs_history"]["history"][0] == 4
    assert set(data["controlled_vs_history"]["se"]) >= {"variance", "official"}
    assert "| history per prompt | 4 |" in (tmp_path / "report_controlled.md").read_text()


def test_ablations_cli_rejects_unknown_variants(tmp_path, capsys):
    from experiments import ablations

    with pytest.raises(SystemExit):
        ablations.main(["--out", str(tmp_path), "--variants", "dynamo,nope"])
    assert "nope" in capsys.readouterr().err


def _no_sweep(*args, **kwargs):
    raise AssertionError("the sweep must not start")


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--set", "allocation.n_low=100"], "allocation.n_low"),
        (["--set", "allocation.mode=foo"], "allocation.mode"),
        (["--set", "eval.every=abc"], "eval.every"),
        (["--set", "eval.nope=1"], "eval.nope"),
        (["--set", "nope.x=1"], "nope.x"),
        (["--steps", "-1"], "train.num_steps"),
    ],
)
def test_ablations_cli_validates_config_before_running(tmp_path, capsys, monkeypatch, flags, field):
    from experiments import ablations

    monkeypatch.setattr(A, "run_sweep", _no_sweep)
    monkeypatch.setattr(A, "ensure_warm_start", _no_sweep)
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exc:
        ablations.main(["--out", str(out), "--variants", "dynamo", "--seeds", "0", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err and field in err
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--seeds", "a,b"], ["--seeds a,b", "comma-separated integers"]),
        (["--set", "eval.every"], ["--set eval.every", "FIELD=VALUE"]),
    ],
)
def test_ablations_cli_malformed_flags_are_usage_errors(tmp_path, capsys, flags, expected):
    from experiments import ablations

    with pytest.raises(SystemExit) as exc:
        ablations.main(["--out", str(tmp_path), "--variants", "dynamo", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(e in err for e in expected)


def test_ablations_cli_audit_command_fails_fast(tmp_path):
    import subprocess

    out = tmp_path / "x"
    cmd = [sys.executable, "-m", "experiments.ablations", "--out", str(out), "--variants"]
    cmd += ["dynamo", "--steps", "1", "--seeds", "0", "--set", "allocation.n_low=100"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "allocation.n_low" in proc.stderr
    assert "run the same command again" not in proc.stdout + proc.stderr
    assert not (out / A.SFT_DIRNAME).exists()


def test_ablations_cli_exits_nonzero_when_the_warm_start_fails(tmp_path, capsys, monkeypatch):
    from experiments import ablations

    log = tmp_path / A.SFT_DIRNAME / "log.txt"
    log.parent.mkdir()
    log.write_text("\n$ python -m experiments.train\nInvalid config:\n  - model.x is wrong\n")
    monkeypatch.setattr(A, "run_sweep", lambda *a, **k: {"dynamo/seed0": "not started"})
    assert ablations.main(["--out", str(tmp_path), "--variants", "dynamo", "--seeds", "0"]) == 1
    text = "".join(capsys.readouterr())
    assert str(log) in text and "run the same command again" not in text


def test_ablations_cli_exits_nonzero_when_a_run_fails(tmp_path, capsys, monkeypatch):
    from experiments import ablations

    sft = tmp_path / A.SFT_DIRNAME / "sft_model"
    sft.mkdir(parents=True)
    (sft / "config.json").write_text("{}")
    log = tmp_path / "grpo" / "seed0" / "log.txt"
    status = {"dynamo/seed0": "done", "grpo/seed0": f"failed (exit 1; see {log})"}
    monkeypatch.setattr(A, "run_sweep", lambda *a, **k: status)
    argv = ["--out", str(tmp_path), "--variants", "dynamo,grpo", "--seeds", "0"]
    assert ablations.main(argv) == 1
    assert f"1 runs failed: see {log}" in capsys.readouterr().err


def test_report_cli_rejects_unknown_parts(tmp_path, capsys):
    from experiments import report

    with pytest.raises(SystemExit) as exc:
        report.main(["--out", str(tmp_path), "--dest", str(tmp_path / "d"), "--only", "foo"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "foo" in err and all(part in err for part in report.PARTS)
    assert not (tmp_path / "d").exists()


def test_report_cli_fails_without_runs(tmp_path, capsys):
    from experiments import report

    dest = tmp_path / "d"
    assert report.main(["--out", str(tmp_path / "none"), "--dest", str(dest), "--only", "sweep"])
    err = capsys.readouterr().err
    assert "<variant>" in err and "seed<k>" in err and "experiments.ablations" in err
    assert not (dest / "results.json").exists()


def test_report_cli_help_documents_every_flag(capsys):
    from experiments import report

    with pytest.raises(SystemExit):
        report.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--only ONLY comma-separated" in text
    assert "--config CONFIG base config" in text
    assert "--seed SEED random seed" in text


def test_report_averages_the_last_evals_every_seed_has():
    """Seeds evaluated every 25 and every 50 steps: the "last 3 evals" column takes steps 200,
    250, 300 for both (each seed's own last three were different windows)."""
    from experiments import report

    def run(every, value_at):
        return {
            "metrics": [
                {"step": s - 1, "eval_accuracy": value_at(s), "zero_variance_frac": 0.5}
                for s in range(every, 301, every)
            ]
        }

    runs = [run(25, lambda s: s / 1000), run(50, lambda s: s / 1000 + 0.1)]
    mean, window = report.last_common_evals(runs)
    assert window == [200, 250, 300]
    assert mean == pytest.approx((0.25 + 0.35) / 2)
    table = report.sweep_tables(
        {
            "dynamo": {
                "0": {
                    **runs[0],
                    "summary": {"heldout_accuracy_after": 0.3, "heldout_accuracy_before": 0.2},
                },
                "3": {
                    **runs[1],
                    "summary": {"heldout_accuracy_after": 0.4, "heldout_accuracy_before": 0.2},
                },
            }
        },
        64,
        None,
    )
    assert "| 0.300 (steps 200, 250, 300) |" in table


def test_report_pairs_each_variant_with_grpo_by_seed():
    """The paired table: per-seed differences to GRPO (end of training and the last 3 common
    evaluations), their standard error and p-value, and the count of seeds below."""
    from experiments import report

    def run(offset, seed):
        return {
            "metrics": [
                {"step": s - 1, "eval_accuracy": 0.3 + s / 1000 + offset + seed / 100}
                for s in range(50, 301, 50)
            ],
            "summary": {"heldout_accuracy_after": 0.6 + offset + seed / 100},
        }

    offsets = {0: -0.010, 1: -0.012, 2: -0.008}
    sweep = {
        "grpo": {s: run(0.0, s) for s in range(3)},
        "dynamo": {s: run(offsets[s], s) for s in range(3)},
    }
    table = report.paired_table(sweep)
    row = next(line for line in table.splitlines() if line.startswith("| DynaMO | GRPO"))
    d = A.paired_difference(
        {s: sweep["dynamo"][s]["summary"]["heldout_accuracy_after"] for s in range(3)},
        {s: sweep["grpo"][s]["summary"]["heldout_accuracy_after"] for s in range(3)},
    )
    assert d["mean"] == pytest.approx(-0.010)
    assert f"{d['mean']:+.4f} +- {d['se']:.4f} (p {d['p']:.3f})" in row
    assert "| 3 of 3 |" in row and "200, 250, 300" in row
