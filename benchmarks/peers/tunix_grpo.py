"""tunix GRPOLearner on the shared tiny Qwen2 (run by benchmarks/bench_peers.py in a tunix venv).

    /tmp/venv_tunix/bin/python benchmarks/peers/tunix_grpo.py SPEC.json

Reads the spec written by bench_peers.py, loads the same safetensors into tunix's Qwen2, trains
`steps` GRPO steps (vanilla rollout engine, actor = rollout on one CPU mesh, no reference model:
beta = 0) and prints one line `RESULT {json}` with `step_s`: the spacing of the reward-function
calls (one call per RL step, after generation, before the update).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time

import jax
import numpy as np
import optax
from transformers import AutoTokenizer
from tunix.models.qwen2 import model as qwen2_model
from tunix.models.qwen2 import params as qwen2_params
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo.grpo_learner import GRPOConfig, GRPOLearner
from tunix.rl.rollout import base_rollout
from tunix.sft import metrics_logger


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    n, g, m = spec["num_prompts"], spec["num_generations"], spec["new_tokens"]
    arch = spec["model"]
    cfg = qwen2_model.ModelConfig(
        num_layers=arch["num_layers"],
        vocab_size=arch["vocab_size"],
        embed_dim=arch["hidden_size"],
        hidden_dim=arch["intermediate_size"],
        num_heads=arch["num_heads"],
        head_dim=arch["head_dim"],
        num_kv_heads=arch["num_kv_heads"],
        rope_theta=int(arch["rope_theta"]),
        norm_eps=arch["rms_norm_eps"],
        use_tied_embedding=arch["tie_word_embeddings"],
    )
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with mesh:
        model = qwen2_params.create_model_from_safe_tensors(spec["model_dir"], cfg, mesh)
    tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    rng = np.random.default_rng(spec["seed"])
    marks: list[float] = []
    lengths: list[float] = []
    rows_seen: list[int] = []

    def reward(prompts, completions, **kwargs):
        marks.append(time.perf_counter())
        # Words of the decoded completion = its tokens (one word per token id >= 2).
        lengths.append(float(np.mean([len(c.split()) for c in completions])))
        rows_seen.append(len(completions))
        return rng.choice([-1.0, 1.0], len(completions)).tolist()

    log_dir = "/tmp/tunix_grpo_bench"
    os.makedirs(log_dir, exist_ok=True)
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={
            rl_cluster_lib.Role.ACTOR: mesh,
            rl_cluster_lib.Role.REFERENCE: mesh,
            rl_cluster_lib.Role.ROLLOUT: mesh,
        },
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optax.adamw(spec["learning_rate"], weight_decay=0.0),
            eval_every_n_steps=10**6,
            max_steps=spec["steps"],
            mini_batch_size=n,  # prompts per optimiser step: one update per RL step
            train_micro_batch_size=n,
            metrics_logging_options=metrics_logger.MetricsLoggerOptions(
                log_dir=log_dir, flush_every_n_steps=10**6
            ),
        ),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=m,
            max_prompt_length=spec["prompt_len"],
            kv_cache_size=spec["prompt_len"] + m + 16,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            # An id outside the vocabulary: no row stops early, every completion is m tokens.
            eos_tokens=[arch["vocab_size"] + 7],
        ),
    )
    cluster = rl_cluster_lib.RLCluster(
        actor=model, reference=None, tokenizer=tok, cluster_config=cluster_config
    )
    learner = GRPOLearner(
        rl_cluster=cluster,
        algo_config=GRPOConfig(num_generations=g, num_iterations=1, beta=0.0, epsilon=0.2),
        reward_fns=[reward],
    )
    prompts = spec["prompts"]
    # Batches as grain yields them: "prompts" a numpy array (a list would be split into leaves
    # by tunix's jax.tree.map(np.repeat, ...)).
    dataset = [{"prompts": np.array(prompts[i * n : (i + 1) * n])} for i in range(spec["steps"])]
    start = time.perf_counter()
    learner.train(dataset)
    step_s = list(np.diff([start] + marks))
    print(
        "RESULT "
        + json.dumps(
            {
                "version": f"google-tunix {importlib.metadata.version('google-tunix')}, "
                f"jax {jax.__version__}",
                "step_s": [float(x) for x in step_s],
                "completion_tokens_mean": lengths,
                "rows_per_reward_call": rows_seen[:3],
                "notes": "on-policy (num_iterations=1): tunix skips the old-log-prob forward",
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
