"""TRL GRPOTrainer on the shared tiny Qwen2 (run by benchmarks/bench_peers.py in a TRL venv).

    /tmp/venv_trl/bin/python benchmarks/peers/trl_grpo.py SPEC.json

Reads the spec written by bench_peers.py (model and tokenizer folders, prompts, sizes), trains
`steps` GRPO steps on CPU and prints one line `RESULT {json}` with `step_s`: the spacing of the
reward-function calls (one call per RL step, made after generation, before the update).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
import transformers
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    torch.manual_seed(spec["seed"])
    n, g, m = spec["num_prompts"], spec["num_generations"], spec["new_tokens"]
    tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    dataset = Dataset.from_dict({"prompt": spec["prompts"]})
    rng = np.random.default_rng(spec["seed"])
    marks: list[float] = []
    lengths: list[float] = []
    rows_seen: list[int] = []

    def reward(prompts, completions, completion_ids=None, **kwargs):
        marks.append(time.perf_counter())
        if completion_ids is not None:
            lengths.append(float(np.mean([len(c) for c in completion_ids])))
        rows_seen.append(len(completions))
        return rng.choice([-1.0, 1.0], len(completions)).tolist()

    args = GRPOConfig(
        output_dir="/tmp/trl_grpo_bench",
        use_cpu=True,
        bf16=False,
        fp16=False,
        per_device_train_batch_size=n * g,  # 64 completions = 8 prompts x 8 per optimiser step
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=g,
        num_iterations=1,
        max_completion_length=m,
        generation_kwargs={"min_new_tokens": m},  # every completion exactly m tokens
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_steps=spec["steps"],
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        shuffle_dataset=False,
        disable_tqdm=True,
        seed=spec["seed"],
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
    )
    start = time.perf_counter()
    trainer.train()
    end = time.perf_counter()
    # Step i's time: from its reward call to the next one; the first from the start of
    # train() (it includes set-up); the last (reward -> end of training) is a partial step.
    del end
    step_s = list(np.diff([start] + marks))
    print(
        "RESULT "
        + json.dumps(
            {
                "version": f"trl {trl.__version__}, transformers {transformers.__version__}, "
                f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
                "step_s": [float(x) for x in step_s],
                "completion_tokens_mean": lengths,
                "rows_per_reward_call": rows_seen[:3],
                "notes": "on-policy (num_iterations=1): TRL skips the old-log-prob forward",
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
