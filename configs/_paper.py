"""Shared settings of the paper's runs (SPEC section 5): Qwen2.5-Math-1.5B / 7B, DynaMO / GRPO.

The four files `configs/qwen2_5_math_{1_5b,7b}_{dynamo,grpo}.py` call `paper_config(model, method)`.
The local paths are REQUIRED overrides; `get_config()` leaves them "" so that the configs load,
validate and compile abstractly without files (tests/test_paper_configs.py), and the run fails at
start (`dynamo_jax.math_task.require_math_paths`) with a message naming each missing field:

    python -m experiments.train --config configs/qwen2_5_math_7b_dynamo.py --workdir runs/7b \\
        --config.model.path=/models/Qwen2.5-Math-7B \\
        --config.data.train_path=/data/math_train.jsonl \\
        --config.eval.benchmarks=AIME24=/data/aime24.jsonl,AIME25=/data/aime25.jsonl,AMC23=/data/amc23.jsonl,MATH500=/data/math500.jsonl,Minerva=/data/minerva.jsonl,Olympiad=/data/olympiad.jsonl

`model.path` is a local Hugging Face folder (config.json, *.safetensors, tokenizer files); the
tokenizer comes from it unless `tokenizer.path` is set. `model.architecture` holds the released
models' config.json values so that the full-size model can be built abstractly (jax.eval_shape)
without the files; when `model.path` is set the folder's own config.json is what is loaded.

Mesh: pure FSDP over every device of the slice/pod (`mesh.fsdp = -1`): parameters, gradients and
Adam moments are split along the model width, batch rows over all devices. Keep
`train.micro_batch_rows` a multiple of the device count (64 rows = one row per chip on 64 chips).
Precision: bfloat16 compute, float32 master weights (a bfloat16 weight cannot absorb lr-1e-6
updates), layers rematerialised in the backward pass.
"""

from __future__ import annotations

import ml_collections

from dynamo_jax.config import apply_modulation_preset, get_default_config

# Hugging Face config.json of Qwen/Qwen2.5-Math-1.5B and Qwen/Qwen2.5-Math-7B.
ARCHITECTURES: dict[str, dict] = {
    "1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
        use_sliding_window=False,
    ),
    "7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        use_sliding_window=False,
    ),
}
METHODS = ("dynamo", "grpo")


def paper_config(model: str, method: str, modulation: str = "decay6") -> ml_collections.ConfigDict:
    """The SPEC-5 run of `method` ("dynamo" | "grpo") on Qwen2.5-Math-`model` ("1.5b" | "7b"),
    with the SPEC 2.3 modulation preset `modulation` ("decay6" | "decay5"; "" = decay6)."""
    if model not in ARCHITECTURES:
        raise ValueError(f"model {model!r}: choose one of {sorted(ARCHITECTURES)}")
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose one of {METHODS}")
    c = get_default_config()
    c.seed = 0

    # SPEC 5: N = 512 prompts, n = 16 rollouts each (B = 8192), DynaMO bounds 8..24.
    c.prompts_per_step = 512
    c.rollouts_per_prompt = 16
    c.allocation.n_low = 8
    c.allocation.n_high = 24
    c.sampling.temperature = 1.0
    c.sampling.top_p = 1.0
    c.sampling.top_k = 0
    # Responses up to 3072 tokens as in the official runs; prompts up to 1024 tokens, so that
    # prompt + response fits max_position_embeddings = 4096.
    c.sampling.max_new_tokens = 3072
    c.buckets.prompt_len = (128, 256, 512, 1024)
    # The KV cache of one row at 4096 positions in bfloat16 is 28 layers x 2 x kv_heads x 128 x
    # 4096 x 2 bytes: 0.11 GiB (1.5B, 2 kv heads) or 0.22 GiB (7B, 4 kv heads). All 8192 rows at
    # once would need 0.9 / 1.8 TiB, so the step is sampled in calls of whole prompt groups:
    # 256 rows = 28 GiB (3.5 GiB a chip on 8 chips), 1024 rows = 224 GiB (3.5 GiB a chip on 64).
    c.sampling.max_rows_per_call = 256 if model == "1.5b" else 1024

    c.train.num_minibatches = 16  # 512 rows per optimiser update
    c.train.micro_batch_rows = 64
    c.train.num_steps = 500
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.1
    c.optim.grad_clip_norm = 1.0
    c.loss.eps_low = 0.2
    c.loss.kl_coef = 0.0
    c.loss.entropy_coef = 0.0
    c.advantage.estimator = "grpo"

    if method == "dynamo":
        c.allocation.mode = "variance"  # SPEC 1
        c.modulation.comp = True  # SPEC 2, "decay6" preset (the config default)
        c.modulation.stab = True
        c.loss.eps_high = 0.28
    else:  # SPEC 6: GRPO baseline, same loss framework
        c.allocation.mode = "uniform"
        c.modulation.comp = False
        c.modulation.stab = False
        c.loss.eps_high = 0.2

    c.model.path = ""  # REQUIRED: local Hugging Face folder (checked when the run starts)
    c.model.architecture = dict(ARCHITECTURES[model])
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.tokenizer.path = ""  # "" = the tokenizer in model.path

    c.data.task = "math"
    c.data.source = "jsonl"
    c.data.train_path = ""  # REQUIRED: local training prompts (checked when the run starts)
    c.data.id_field = "id"  # rows without it are numbered
    c.data.prompt_field = "problem"
    c.data.answer_field = "answer"

    # SPEC 7: Pass@1 (mean over 32 samples) and Pass@32 on the benchmark files given as
    # --config.eval.benchmarks=AIME24=...,AIME25=...,AMC23=...,MATH500=...,Minerva=...,Olympiad=...
    c.eval.benchmarks = ""
    c.eval.samples_per_prompt = 32
    c.eval.pass_k = 32
    c.eval.every = 50
    c.eval.greedy = False

    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.log_every = 1

    c.mesh.data = 1
    c.mesh.fsdp = -1  # every device
    c.mesh.tensor = 1
    apply_modulation_preset(c, modulation or "decay6")
    return c
