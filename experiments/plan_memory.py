"""Per-device memory of a config's run, before it runs: will it fit?

    python -m experiments.plan_memory --config configs/qwen2_5_math_7b_dynamo.py \\
        --devices 64 --hbm_gib 16
    python -m experiments.plan_memory --config configs/arith_tiny.py --vocab_size 18

Builds the model abstractly (no weights), compiles the step's whole update (the step's rows at the
longest prompt bucket + sampling.max_new_tokens, in train.num_minibatches optimiser updates of
train.micro_batch_rows-row micro-batches) for the config's mesh and prints what XLA says each device
holds, with the sampler's KV cache and weight copy. --devices N plans for N devices simulated on
this machine's CPU (a pod's plan on a laptop); without it, for the devices JAX sees here. With
--hbm_gib the command exits with status 1 and names the fields to change when the peak does not fit;
--suggest then searches the largest train.micro_batch_rows (and whether remat is needed) that fits.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a Python file with get_config()).", lock_config=True
)
_DEVICES = flags.DEFINE_integer(
    "devices",
    0,
    "Plan for this many devices, simulated on the CPU (0: the devices JAX sees here).",
    lower_bound=0,
)
_HBM = flags.DEFINE_float(
    "hbm_gib",
    0.0,
    "Memory per device in GiB that JAX may use (e.g. 16 for a TPU v5e; on a GPU JAX takes 75% "
    "of it by default, about 59 of an 80 GB H100, unless XLA_PYTHON_CLIENT_MEM_FRACTION says "
    "otherwise); 0: do not judge.",
    lower_bound=0.0,
)
_VOCAB = flags.DEFINE_integer(
    "vocab_size",
    0,
    "model.architecture.vocab_size for configs that take it from the tokenizer a run builds "
    "(the embedded arithmetic task's is 18).",
    lower_bound=0,
)
_SUGGEST = flags.DEFINE_bool(
    "suggest",
    False,
    "With --hbm_gib, when the plan does not fit: search the largest train.micro_batch_rows "
    "(then with model.remat=True) that fits, one compile per try.",
)
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _DEVICES.value:
        # Before JAX starts its backends: N simulated CPU devices.
        flag = f"--xla_force_host_platform_device_count={_DEVICES.value}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from dynamo_jax import config as config_lib
    from dynamo_jax import memory_plan

    if _DEVICES.value:
        jax.config.update("jax_platforms", "cpu")
        if jax.device_count() != _DEVICES.value:
            sys.exit(
                f"--devices {_DEVICES.value}: JAX already started with {jax.device_count()} "
                "devices (was XLA_FLAGS set to another count?)"
            )
    config = _CONFIG.value
    if _VOCAB.value:
        with config.unlocked():
            config.model.architecture.vocab_size = _VOCAB.value
    try:
        config_lib.validate(config)
        plan = memory_plan.plan_memory(config)
    except (config_lib.ConfigError, ValueError, FileNotFoundError) as err:
        sys.exit(str(err))
    print(plan.table())
    if _HBM.value:
        if plan.peak_gib <= _HBM.value:
            print(f"fits: peak {plan.peak_gib:.2f} GiB <= {_HBM.value:g} GiB per device")
        else:
            print(
                f"does NOT fit: peak {plan.peak_gib:.2f} GiB > {_HBM.value:g} GiB per device. "
                + memory_plan.memory_advice(config)
            )
            if _SUGGEST.value:
                print("searching a micro-batch that fits:")
                found = memory_plan.suggest_fit(config, _HBM.value, log=print)
                if found is None:
                    print(
                        "no train.micro_batch_rows down to one row per row shard (data x fsdp) "
                        "fits, with or without remat: lower loss.logits_chunk_size or "
                        "sampling.max_rows_per_call, use bfloat16 compute, or add devices"
                    )
                else:
                    fields, fit = found
                    flags_ = " ".join(f"--config.{k}={v}" for k, v in fields.items())
                    print(f"fits with {flags_}: peak {fit.peak_gib:.2f} GiB")
            sys.exit(1)


if __name__ == "__main__":
    from dynamo_jax import config as config_lib

    config_lib.exit_on_bad_command_line(sys.argv)
    app.run(main)
