"""DynaMO on Qwen2.5-Math-1.5B with the SPEC 5 settings: variance-minimising rollout allocation
(8..24 per prompt), gradient-aware advantage modulation (decay6), eps_high 0.28.

    python -m experiments.train --config configs/qwen2_5_math_1_5b_dynamo.py \\
        --workdir runs/1_5b_dynamo --config.model.path=/models/Qwen2.5-Math-1.5B \\
        --config.data.train_path=/data/train.jsonl \\
        --config.eval.benchmarks=AIME24=/data/aime24.jsonl,MATH500=/data/math500.jsonl

model.path and data.train_path are required (checked when the run starts, not here). Shared
settings and the mesh: configs/_paper.py.
"""

from configs._paper import paper_config


def get_config():
    return paper_config("1.5b", "dynamo")
