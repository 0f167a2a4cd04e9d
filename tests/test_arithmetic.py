import numpy as np
import pytest

from dynamo_jax.tasks import arithmetic
from dynamo_jax.tokenizer import load_tokenizer


def test_problems_are_correct_distinct_and_splits_disjoint():
    train, heldout = arithmetic.make_splits(seed=3, num_train=500, num_heldout=100)
    assert len({r["id"] for r in train}) == 500
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    for r in train[:200]:
        expr = r["prompt"].rstrip("=")
        assert str(eval(expr)) == r["answer"][::-1]  # right, least-significant digit first
    assert arithmetic.make_splits(3, 500, 100) == (train, heldout)  # deterministic


def test_verifier():
    got = arithmetic.verify(["19", " 19 ", "19 extra", "20", "", "1 9"], ["19"] * 6)
    np.testing.assert_array_equal(got, [True, True, True, False, False, False])
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        arithmetic.verify(["1", "2"], ["1"])


def test_impossible_problem_count_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct problems"):
        arithmetic.make_problems(500, 0, "x", mix=(("+", 1, 1, 1.0),))


def test_tokenizer_is_character_level(tmp_path):
    train, _ = arithmetic.make_splits(0, 300, 10)
    tok = load_tokenizer(arithmetic.train_tokenizer(train, str(tmp_path)))
    ids = tok.encode("12+7=")
    assert len(ids) == 5 and tok.decode(ids + list(tok.eos_ids)) == "12+7="
    assert tok.eos_ids == (3,) and tok.pad_id == 0


def test_problem_set_is_the_same_in_every_process():
    import subprocess
    import sys

    code = (
        "from dynamo_jax.tasks.arithmetic import make_splits; print(make_splits(0, 50, 10)[0][-1])"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1 and "arith-train-00049" in outs.pop()


def test_label_noise_changes_one_digit_of_the_requested_share():
    train, _ = arithmetic.make_splits(0, 2000, 10)
    noisy = arithmetic.with_label_noise(train, 0.3, seed=1)
    changed = [
        (a["answer"], b["answer"])
        for a, b in zip(train, noisy, strict=True)
        if a["answer"] != b["answer"]
    ]
    assert 0.25 < len(changed) / len(train) < 0.35
    for clean, wrong in changed:
        assert (
            len(clean) == len(wrong) and sum(x != y for x, y in zip(clean, wrong, strict=True)) == 1
        )
    assert [r["id"] for r in noisy] == [r["id"] for r in train]
    assert arithmetic.with_label_noise(train, 0.0, 1) == train
    with pytest.raises(ValueError, match="label noise"):
        arithmetic.with_label_noise(train, 1.0, 1)


def test_a_tokenizer_missing_a_character_is_named_before_training(tmp_path):
    """With 8 training problems the task's tokenizer never sees the digit 2: held-out prompts
    and answers holding it would encode to <unk> (decoded as nothing), capping accuracy
    silently. build_task refuses, naming the record, the character and what to change."""
    from dynamo_jax import trainer
    from dynamo_jax.config import get_default_config

    config = get_default_config()
    config.data.num_train = 8
    with pytest.raises(trainer.RunError, match=r"lacks: \['2'\].*raise data.num_train"):
        trainer.build_task(config, str(tmp_path))
    config.data.num_train = 2000
    assert trainer.build_task(config, str(tmp_path / "ok")).heldout
