import numpy as np
import pytest

from dynamo_jax.tasks import arithmetic
from dynamo_jax.tokenizer import load_tokenizer


def test_problems_are_correct_distinct_and_splits_disjoint():
    splits = arithmetic.make_splits(
        seed=3, num_train=500, num_heldout=100, num_warm_start=300, num_validation=50
    )
    sizes = {"train": 500, "heldout": 100, "warm_start": 300, "validation": 50}
    prefix = {"train": "train", "heldout": "heldout", "warm_start": "sft", "validation": "val"}
    prompts = []
    for name, size in sizes.items():
        records = getattr(splits, name)
        assert len(records) == size
        assert [r["id"] for r in records] == [f"arith-{prefix[name]}-{i:05d}" for i in range(size)]
        prompts += [r["prompt"] for r in records]
    assert len(set(prompts)) == len(prompts)  # disjoint and distinct
    for r in splits.train[:200] + splits.heldout:
        expr = r["prompt"].rstrip("=")
        assert str(eval(expr)) == r["answer"][::-1]  # right, least-significant digit first
    assert arithmetic.make_splits(3, 500, 100, 300, 50) == splits  # deterministic
    assert arithmetic.make_splits(3, 500, 100) != splits[:2]  # the pool depends on every size


def test_every_split_has_the_same_difficulty_mix():
    """The default sizes ask for 8,400 distinct problems, of which only 255 single-digit ones
    exist. Drawn split after split, the held-out set took most of them (45.5% of it against
    8.2% of the RL prompts and 0% of the warm-start pool), so held-out accuracy measured an
    easier task than the one trained on. Dealt from one pool, every split holds every class in
    proportion to its size, up to a problem or two."""
    from collections import Counter

    splits = arithmetic.make_splits(0, 2000, 200, num_warm_start=6000, num_validation=200)
    pool = [r for part in splits for r in part]
    whole = Counter(arithmetic.difficulty_class(r["prompt"]) for r in pool)
    assert len(whole) >= 7
    for part in splits:
        mix = Counter(arithmetic.difficulty_class(r["prompt"]) for r in part)
        for cls, count in whole.items():
            expected = count * len(part) / len(pool)
            assert abs(mix[cls] - expected) <= 2, (cls, mix[cls], expected)
    # the small classes are in every split, the held-out set first of all
    single = [c for c in whole if c[1:] == "1x1"]
    assert all(
        Counter(arithmetic.difficulty_class(r["prompt"]) for r in splits.heldout)[c] >= 1
        for c in single
    )
    # any prefix is a sample of the split (eval.num_prompts takes the first ones)
    first = Counter(arithmetic.difficulty_class(r["prompt"]) for r in splits.train[:500])
    assert first["+2x2"] / 500 == pytest.approx(whole["+2x2"] / len(pool), abs=0.08)


def test_difficulty_class():
    assert arithmetic.difficulty_class("12+7=") == "+2x1"
    assert arithmetic.difficulty_class("3*4=") == "*1x1"
    assert arithmetic.difficulty_class("40-13=") == "-2x2"
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        arithmetic.difficulty_class("hello")


def test_verifier():
    got = arithmetic.verify(["19", " 19 ", "19 extra", "20", "", "1 9"], ["19"] * 6)
    np.testing.assert_array_equal(got, [True, True, True, False, False, False])
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        arithmetic.verify(["1", "2"], ["1"])


def test_impossible_problem_count_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct problems"):
        arithmetic.make_problems(500, 0, "x", mix=(("+", 1, 1, 1.0),))


def test_tokenizer_is_character_level(tmp_path):
    train = arithmetic.make_splits(0, 300, 10).train
    tok = load_tokenizer(arithmetic.train_tokenizer(train, str(tmp_path)))
    ids = tok.encode("12+7=")
    assert len(ids) == 5 and tok.decode(ids + list(tok.eos_ids)) == "12+7="
    assert tok.eos_ids == (3,) and tok.pad_id == 0


def test_problem_set_is_the_same_in_every_process():
    import subprocess
    import sys

    code = (
        "from dynamo_jax.tasks.arithmetic import make_splits; "
        "print(make_splits(0, 50, 10).train[-1])"
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
    train = arithmetic.make_splits(0, 2000, 10).train
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
    """With 10 training problems the task's tokenizer never sees the digit 0: held-out prompts
    and answers holding it would encode to <unk> (decoded as nothing), capping accuracy
    silently. build_task refuses, naming the record, the character and what to change."""
    from dynamo_jax import trainer
    from dynamo_jax.config import get_default_config

    config = get_default_config()
    config.data.num_train = 10
    with pytest.raises(trainer.RunError, match=r"lacks: \['0'\].*raise data.num_train"):
        trainer.build_task(config, str(tmp_path))
    config.data.num_train = 2000
    assert trainer.build_task(config, str(tmp_path / "ok")).heldout


def test_split_sizes_the_task_cannot_hold_name_the_fields(tmp_path):
    from dynamo_jax import trainer
    from dynamo_jax.config import get_default_config

    config = get_default_config()
    config.sft.num_examples = 20000
    with pytest.raises(trainer.RunError, match=r"data.num_train = 2000.*sft.num_examples = 20000"):
        trainer.build_task(config, str(tmp_path))


def test_the_warm_start_early_stop_is_scored_on_the_validation_split(tmp_path):
    """The warm start stops at sft.target_accuracy; scored on the held-out set, the reported
    result would have chosen when to stop. The task's validation split is disjoint from it and
    from what the warm start trains on, with the same mix."""
    from dynamo_jax import trainer
    from dynamo_jax.config import get_default_config

    config = get_default_config()
    config.sft.steps = 1
    task = trainer.build_task(config, str(tmp_path))
    assert len(task.validation) == config.data.num_heldout
    held = {r["prompt"] for r in task.heldout}
    val = {r["prompt"] for r in task.validation}
    trained = {r["prompt"] for r in task.sft_examples}
    assert not val & held and not val & trained and not val & {r["prompt"] for r in task.train}
    # the held-out set does not depend on whether a warm start runs
    config.sft.steps = 0
    again = trainer.build_task(config, str(tmp_path))
    assert again.heldout == task.heldout and again.sft_examples is None


def test_a_cached_warm_start_must_have_learned_from_the_same_records(tmp_path):
    """The same settings drew other splits before the pool was dealt by class: a warm start
    cached by that code learned from other problems. The fingerprint carries a digest of what
    the warm start trains on and is stopped by; a cache without one cannot be trusted."""
    import json

    from configs import arith_tiny
    from dynamo_jax import trainer

    config = arith_tiny.get_config()
    task = trainer.build_task(config, str(tmp_path / "w"))
    fp = trainer.warm_start_fingerprint(config, task)
    assert trainer._DATA_DIGEST in fp
    cache = tmp_path / "sft"
    cache.mkdir()
    (cache / "sft_summary.json").write_text(json.dumps({"fingerprint": fp}))
    trainer.check_warm_start(str(cache), fp)
    task.sft_examples = task.sft_examples[::-1][:-1] + [task.train[0]]  # other records, same count
    with pytest.raises(trainer.RunError, match="data.warm_start_digest"):
        trainer.check_warm_start(str(cache), trainer.warm_start_fingerprint(config, task))
    old = {k: v for k, v in fp.items() if k != trainer._DATA_DIGEST}
    (cache / "sft_summary.json").write_text(json.dumps({"fingerprint": old}))
    with pytest.raises(trainer.RunError, match="data.warm_start_digest"):
        trainer.check_warm_start(str(cache), fp)
    config.sft.steps = 0  # no warm start: nothing to compare
    assert trainer._DATA_DIGEST not in trainer.warm_start_fingerprint(config, task)


def test_the_warm_start_is_stopped_by_the_validation_split_not_the_held_out_set(
    tmp_path, monkeypatch
):
    """build_model scores the early stop on Task.validation (it scored task.heldout)."""
    from configs import arith_tiny
    from dynamo_jax import sharding as shd
    from dynamo_jax import trainer

    config = arith_tiny.get_config()
    config.model.architecture.update(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    config.sft.steps, config.sft.eval_every, config.sft.batch_size = 2, 1, 8
    config.eval.num_prompts = 5
    task = trainer.build_task(config, str(tmp_path))
    scored = []

    def fake_evaluate(sampler, params, task, records, config, key):
        scored.append([r["id"] for r in records])
        return {"accuracy": 0.0}

    monkeypatch.setattr(trainer, "evaluate", fake_evaluate)
    mesh = shd.make_mesh(data=-1, fsdp=1, tensor=1)
    trainer.build_model(config, task, str(tmp_path), mesh, log=lambda _: None)
    assert scored == [[r["id"] for r in task.validation[:5]]] * 2
    assert all(i.startswith("arith-val-") for i in scored[0])
