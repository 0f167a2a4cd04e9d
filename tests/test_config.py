import re

import pytest

from dynamo_jax import config as cfg_lib


def test_default_config_is_valid_and_has_spec_defaults():
    c = cfg_lib.get_default_config()
    cfg_lib.validate(c)
    assert c.rollouts_per_prompt == 16 and c.prompts_per_step == 512
    assert (c.allocation.n_low, c.allocation.n_high) == (8, 24)
    assert c.allocation.mode == "variance" and c.allocation.refresh == "step"
    assert c.allocation.stats_decay == 1.0 and c.allocation.min_history == 4
    assert c.allocation.unexplored_weight is None and c.allocation.weight_exponent == 1.0
    assert (c.loss.eps_low, c.loss.eps_high, c.loss.dual_clip) == (0.2, 0.28, 10.0)
    assert c.modulation.alpha == 0.2 and c.modulation.lambda_min == 0.6
    assert c.modulation.gamma == 50.0 and c.modulation.tau == 0.99
    assert c.modulation.scope == "micro_batch" and c.modulation.expectation == "sequence"
    assert c.optim.learning_rate == 1e-6 and c.optim.warmup_steps == 10
    assert c.optim.weight_decay == 0.1 and c.optim.grad_clip_norm == 1.0
    assert c.train.num_minibatches == 16 and c.advantage.estimator == "grpo"


def test_default_evaluation_reports_the_k_it_samples():
    """pass_k defaulted to 32 with 4 samples per prompt: every run on the defaults reported
    pass@4 in place of the pass@32 it asked for (with a note). The default asks for what it
    samples."""
    c = cfg_lib.get_default_config()
    assert c.eval.pass_k <= c.eval.samples_per_prompt


@pytest.mark.parametrize(
    "spec",
    [
        "configs/arith_tiny.py",
        "configs/qwen2_5_math_1_5b_dynamo.py",
        "configs/qwen2_5_math_7b_dynamo.py",
    ],
)
def test_the_decay5_preset_is_one_config_argument_away(spec):
    """SPEC 2.3's preset decay5 (alpha 0.4, tau 0.9) from the command line: --config FILE:decay5.
    Without the argument the config keeps decay6."""
    c = cfg_lib.load_config_file(f"{spec}:decay5")
    assert (c.modulation.alpha, c.modulation.lambda_min, c.modulation.tau) == (0.4, 0.6, 0.9)
    d = cfg_lib.load_config_file(spec)
    assert (d.modulation.alpha, d.modulation.tau) == (0.2, 0.99)
    cfg_lib.validate(c)
    with pytest.raises(ValueError, match="decay5"):
        cfg_lib.load_config_file(f"{spec}:decay7")


def test_unknown_key_is_rejected_with_suggestion():
    c = cfg_lib.get_default_config().to_dict()
    c["allocation"]["n_hgih"] = 30
    with pytest.raises(cfg_lib.ConfigError, match=r"allocation\.n_hgih.*allocation\.n_high"):
        cfg_lib.validate(c)


def test_unknown_key_without_a_close_match_is_a_config_error():
    c = cfg_lib.get_default_config().to_dict()
    c["eval"]["zzzz"] = 1  # no suggestion: once an IndexError
    with pytest.raises(cfg_lib.ConfigError, match=r"Unknown config field 'eval.zzzz'\. Known"):
        cfg_lib.validate(c)


def test_wrong_type_names_field():
    c = cfg_lib.get_default_config().to_dict()
    c["train"]["num_minibatches"] = 2.5
    c["modulation"]["comp"] = "yes"
    with pytest.raises(cfg_lib.ConfigError) as err:
        cfg_lib.validate(c)
    assert "train.num_minibatches" in str(err.value) and "modulation.comp" in str(err.value)


def test_infeasible_budget_names_numbers():
    c = cfg_lib.get_default_config()
    c.allocation.n_low = 20
    with pytest.raises(cfg_lib.ConfigError) as err:
        cfg_lib.validate(c)
    msg = str(err.value)
    assert "8192" in msg and "10240" in msg and "allocation.n_low" in msg


def test_bad_choice_and_divisibility():
    c = cfg_lib.get_default_config()
    c.allocation.mode = "neyman"
    c.train.num_minibatches = 7
    with pytest.raises(cfg_lib.ConfigError) as err:
        cfg_lib.validate(c)
    assert "allocation.mode = 'neyman'" in str(err.value)
    assert "train.num_minibatches = 7" in str(err.value)


def test_official_mode_needs_room_for_the_first_allocation():
    """official gives each prompt without history min(max(n_low, 4), n_high) rollouts: a budget
    below that must fail at validation, not at the first step's allocation."""
    c = cfg_lib.get_default_config()
    c.allocation.mode = "official"
    c.prompts_per_step, c.rollouts_per_prompt = 4, 3
    c.allocation.n_low, c.allocation.n_high = 2, 8
    c.train.num_minibatches, c.train.micro_batch_rows = 1, 12
    with pytest.raises(cfg_lib.ConfigError, match=r"rollouts_per_prompt >= 4 \(got 3\)"):
        cfg_lib.validate(c)
    c.rollouts_per_prompt, c.train.micro_batch_rows = 4, 16
    cfg_lib.validate(c)
    c.rollouts_per_prompt, c.allocation.n_high = 3, 3  # n_high caps the first allocation
    c.train.micro_batch_rows = 12
    cfg_lib.validate(c)


def test_uniform_mode_ignores_bounds():
    c = cfg_lib.get_default_config()
    c.allocation.mode = "uniform"
    c.allocation.n_low, c.allocation.n_high = 20, 30
    cfg_lib.validate(c)


def test_presets():
    c = cfg_lib.get_default_config()
    cfg_lib.apply_modulation_preset(c, "decay5")
    assert (c.modulation.alpha, c.modulation.lambda_min, c.modulation.tau) == (0.4, 0.6, 0.9)
    with pytest.raises(ValueError, match="decay6"):
        cfg_lib.apply_modulation_preset(c, "decay7")


def test_command_line_config_file_and_overrides_are_checked(tmp_path):
    """A misspelled --config.<field> or a bad config file: one message naming the field or the
    file (absl reports them as a KeyError traceback or an opaque placeholder object)."""
    check = cfg_lib.check_config_args
    base = ["train", "--config", "configs/arith_tiny.py"]
    check([*base, "--config.train.num_steps=3", "--config.modulation.comp=false"])
    check(["train", "--config=configs/arith_tiny.py", "--help"])
    with pytest.raises(
        cfg_lib.ConfigError,
        match=r"--config.trian.num_steps: no such config field"
        r"\. Did you mean --config.train.num_steps",
    ):
        check([*base, "--config.trian.num_steps=1"])
    with pytest.raises(cfg_lib.ConfigError, match=r"Fields of train: \['micro_batch_rows'"):
        check([*base, "--config.train.lr", "0.1"])
    with pytest.raises(cfg_lib.ConfigError, match=r"--config configs/nope.py: no such file"):
        check(["train", "--config", "configs/nope.py"])
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    with pytest.raises(cfg_lib.ConfigError, match=rf"--config {bad}: line 1: syntax error"):
        check(["train", "--config", str(bad)])
    bad.write_text("x = 1\n")
    with pytest.raises(cfg_lib.ConfigError, match="defines no get_config"):
        check(["train", "--config", str(bad)])
    bad.write_text("def get_config():\n    return {}['missing']\n")
    with pytest.raises(cfg_lib.ConfigError, match=r"get_config\(\) raised KeyError \(line 2\)"):
        check(["train", "--config", str(bad)])


def test_sft_settings_that_cannot_run_are_rejected():
    c = cfg_lib.get_default_config()
    c.sft.steps, c.sft.batch_size, c.sft.eval_every = -5, 0, 0
    with pytest.raises(cfg_lib.ConfigError) as err:
        cfg_lib.validate(c)
    for field in ("sft.steps = -5", "sft.batch_size = 0", "sft.eval_every = 0"):
        assert field in str(err.value)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("optim.b1", 1.0, "optim.b1 = 1.0 must be in [0, 1)"),
        ("optim.b2", 1.5, "optim.b2 = 1.5 must be in [0, 1)"),
        ("optim.eps", 0.0, "optim.eps = 0.0 must be > 0"),
        ("optim.weight_decay", -0.1, "optim.weight_decay must be >= 0"),
        ("loss.entropy_coef", -1e-3, "loss.entropy_coef must be >= 0"),
        ("modulation.tau", 1.5, "modulation.tau = 1.5 must be in (0, 1]"),
        ("modulation.tau", 0.0, "modulation.tau = 0.0 must be in (0, 1]"),
        ("advantage.correct_reward", -2.0, "must be above advantage.incorrect_reward"),
        ("data.num_heldout", 0, "data.num_heldout must be >= 1"),
        ("sft.num_examples", 0, "sft.num_examples must be >= 1"),
        ("sft.learning_rate", -3e-3, "sft.learning_rate must be > 0"),
        ("sft.target_accuracy", 1.5, "sft.target_accuracy = 1.5 must be in [0, 1]"),
        ("eval.pass_k", 0, "eval.pass_k = 0 must be >= 1"),
        ("eval.every", -1, "eval.every = -1 must be >= 0"),
        ("buckets.prompt_len", (0, 64), "lengths must be >= 1"),
        ("data.seed", -1, "data.seed = -1 must be >= 0"),
        ("distributed.num_processes", -1, "distributed.num_processes must be >= 0"),
    ],
)
def test_values_that_cannot_work_are_rejected(field, value, message):
    """Each passed validation before (an audit of every field): NaN updates (Adam betas, eps),
    a setting silently ignored (negative entropy bonus) or inverted (rewards), no held-out set."""
    c = cfg_lib.get_default_config()
    c.data.task, c.sft.steps = "arithmetic", 10
    section, name = field.rsplit(".", 1)
    c[section][name] = value
    with pytest.raises(cfg_lib.ConfigError, match=re.escape(message)):
        cfg_lib.validate(c)


def test_weight_exponent_zero_is_allowed():
    c = cfg_lib.get_default_config()
    c.allocation.weight_exponent = 0.0  # every explored prompt weighs the same (documented)
    cfg_lib.validate(c)
