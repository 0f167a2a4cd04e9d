"""The supervised warm start (dynamo_jax.sft): its learning-rate schedule and the accuracy it
reports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynamo_jax import models, sft

ARCH = dict(
    model_type="qwen2",
    vocab_size=16,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_theta=1e4,
)
PROMPTS = [[4, 5, 6], [7, 8], [9, 10, 11, 12]]
ANSWERS = [[5, 3], [6, 6, 3], [13, 3]]


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _warm_start(steps, **kw):
    model = models.init_model(models.ModelConfig.from_hf_dict(ARCH), 0)
    before = _params(model)
    model, summary = sft.supervised_warm_start(
        model,
        PROMPTS,
        ANSWERS,
        steps=steps,
        batch_size=2,
        learning_rate=1e-2,
        pad_id=0,
        log=lambda _: None,
        **kw,
    )
    return before, model, summary


def test_one_step_warm_start_runs_and_its_update_learns():
    """steps = 1 used to fail inside optax (an empty cosine part), and the first update of every
    warm start ran at learning rate 0."""
    before, model, summary = _warm_start(1)
    assert summary["sft_steps"] == 1
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(before, _params(model), strict=True))
    assert moved > 1e-4


@pytest.mark.parametrize("steps", [2, 25])
def test_every_update_learns(steps):
    """Neither the first update (warm-up at 0) nor the last (cosine at its end) has lr 0: the
    parameters move at every step (compared with the run one step shorter, same data)."""
    _, shorter, _ = _warm_start(steps - 1)
    _, full, _ = _warm_start(steps)
    moved = max(
        float(np.max(np.abs(a - b))) for a, b in zip(_params(shorter), _params(full), strict=True)
    )
    assert moved > 1e-6


def test_reported_accuracy_is_of_the_returned_model():
    """25 steps scored every 10: the last score was of the step-20 model; the summary must hold
    the score of the model it returns (step 25)."""

    def evaluate(model):  # a deterministic function of the parameters, below the target
        total = sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(nnx.state(model)))
        return (total % 1.0) * 0.5

    _, model, summary = _warm_start(25, evaluate=evaluate, eval_every=10, target_accuracy=0.99)
    assert summary["sft_steps"] == 25
    assert summary["sft_accuracy"] == pytest.approx(evaluate(model))
