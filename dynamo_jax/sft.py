"""Supervised warm start: teach a small model a task's answer format before RL.

Cross-entropy on the answer tokens (and EOS) of `prompt + answer + EOS` sequences, in the same
left-padded packed layout the RL step uses (`train_step.batch_from_rollouts`), with AdamW.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dynamo_jax import train_step as ts


def pack_examples(
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    prompt_len: int,
    answer_len: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Token lists -> packed batch (answers already end with EOS). Errors name the example."""
    rows = len(prompts)
    p_tok = np.full((rows, prompt_len), pad_id, np.int32)
    a_tok = np.full((rows, answer_len), pad_id, np.int32)
    a_mask = np.zeros((rows, answer_len), np.float32)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        if not 1 <= len(p) <= prompt_len or len(a) > answer_len:
            raise ValueError(
                f"example {i}: prompt of {len(p)} tokens / answer of {len(a)} tokens does not "
                f"fit prompt_len={prompt_len} / answer_len={answer_len}"
            )
        p_tok[i, : len(p)] = p
        a_tok[i, : len(a)] = a
        a_mask[i, : len(a)] = 1.0
    lengths = np.array([len(p) for p in prompts])
    return ts.batch_from_rollouts(p_tok, lengths, a_tok, a_mask, pad_id)


def _sft_step(graphdef, rest, tx, settings, params, opt_state, batch):
    def loss_fn(p):
        stats = ts.response_token_stats(
            graphdef, p, rest, batch, settings.temperature, settings.logits_chunk_size
        )
        m = batch["response_mask"]
        return -jnp.sum(stats.logp * m) / jnp.maximum(jnp.sum(m), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def supervised_warm_start(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    pad_id: int,
    seed: int = 0,
    evaluate: Callable[[nnx.Module], float] | None = None,
    eval_every: int = 50,
    target_accuracy: float = 0.0,
    log: Callable[[str], None] = print,
) -> tuple[nnx.Module, dict[str, Any]]:
    """Trains `model` in place for up to `steps` steps; stops early once `evaluate(model)`
    (the accuracy on a validation split, not on what the run reports) reaches `target_accuracy`
    (> 0). Returns (model, summary); its `sft_accuracy` is that score of the returned model."""
    graphdef, params, rest = ts.split_model(model)
    prompt_len = max(len(p) for p in prompts)
    answer_len = max(len(a) for a in answers)
    warmup = min(50, steps // 10 + 1)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup, max(steps, warmup) + 1
    )
    # Update c (0-based) uses the schedule at c + 1 in 1..steps: the first update already
    # learns (at 0 the warm-up is at 0), as in train_step.make_optimizer, and the cosine ends
    # one past the last update, so the last one is not at 0 either.
    tx = optax.adamw(lambda count: schedule(count + 1), weight_decay=0.0)
    opt_state = tx.init(params)
    settings = ts.StepSettings(logits_chunk_size=answer_len)
    step_fn = jax.jit(functools.partial(_sft_step, graphdef, rest, tx, settings))
    rng = np.random.default_rng(seed)
    n = len(prompts)
    losses, accuracy, done = [], None, 0
    for step in range(steps):
        idx = rng.choice(n, size=batch_size, replace=n < batch_size)
        batch = pack_examples(
            [prompts[i] for i in idx], [answers[i] for i in idx], prompt_len, answer_len, pad_id
        )
        params, opt_state, loss = step_fn(params, opt_state, batch)
        losses.append(float(loss))
        done = step + 1
        if evaluate is not None and target_accuracy > 0 and done % eval_every == 0:
            nnx.update(model, params)
            accuracy = evaluate(model)
            log(
                f"sft step {done}: loss {np.mean(losses[-eval_every:]):.4f}, "
                f"validation accuracy {accuracy:.3f}"
            )
            if accuracy >= target_accuracy:
                break
    nnx.update(model, params)
    if evaluate is not None and target_accuracy > 0 and done % eval_every:
        # The last evaluation was of an earlier model: score the one returned.
        accuracy = evaluate(model)
        log(f"sft step {done}: validation accuracy {accuracy:.3f}")
    return model, {
        "sft_steps": done,
        "sft_final_loss": float(np.mean(losses[-10:])),
        "sft_accuracy": accuracy,
    }
