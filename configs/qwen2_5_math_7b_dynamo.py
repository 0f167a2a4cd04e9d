"""DynaMO on Qwen2.5-Math-7B with the SPEC 5 settings: variance-minimising rollout allocation
(8..24 per prompt), gradient-aware advantage modulation (decay6), eps_high 0.28.

    python -m experiments.train --config configs/qwen2_5_math_7b_dynamo.py \\
        --workdir runs/7b_dynamo --config.model.path=/models/Qwen2.5-Math-7B \\
        --config.data.train_path=/data/train.jsonl \\
        --config.eval.benchmarks=AIME24=/data/aime24.jsonl,AIME25=/data/aime25.jsonl,AMC23=/data/amc23.jsonl,MATH500=/data/math500.jsonl,Minerva=/data/minerva.jsonl,Olympiad=/data/olympiad.jsonl

SPEC 7 reports the average over those six benchmarks (benchmark files name their columns
with NAME=path?prompt=<column>&answer=<column>, docs/EVALUATION.md).
model.path and data.train_path are required (checked when the run starts, not here). Shared
settings and the mesh: configs/_paper.py. The SPEC 2.3 preset decay5 instead of decay6:
--config configs/qwen2_5_math_7b_dynamo.py:decay5.
"""

from configs._paper import paper_config


def get_config(modulation: str = "decay6"):
    return paper_config("7b", "dynamo", modulation)
