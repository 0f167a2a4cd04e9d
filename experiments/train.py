"""Train a policy with DynaMO (or a baseline) RL.

    python -m experiments.train --config configs/arith_tiny.py --workdir runs/arith_tiny
    python -m experiments.train --config configs/arith_tiny.py --workdir runs/x \\
        --config.train.num_steps=100 --config.allocation.mode=uniform

Every field of the config can be overridden with --config.<section>.<field>=value; the config is
validated (unknown fields, types, impossible budgets) before anything heavy starts. Running the
same command again with the same --workdir resumes from the latest checkpoint. The work dir
holds metrics.jsonl, tensorboard/, checkpoints/, summary.json and prompt_stats.csv
(`tensorboard --logdir <workdir>/tensorboard`).

Devices: every device JAX sees joins one mesh, --config.mesh.data / .fsdp / .tensor (-1 takes
the devices left over; data x fsdp must divide prompts_per_step x rollouts_per_prompt). Try a
mesh on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=8. Multi-host:
--config.distributed.* (or a launcher JAX detects). Errors that name a field or file print
without a traceback; DYNAMO_JAX_TRACEBACK=1 shows it.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file (a Python file with get_config()).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Directory for checkpoints, metrics and the cached warm start; a run "
    "started again with the same workdir resumes.",
)
_PROGRESS = flags.DEFINE_bool(
    "progress", True, "Show the console progress bar; --noprogress turns it off (logs, sweeps)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    from dynamo_jax import config as config_lib
    from dynamo_jax import trainer

    config = _CONFIG.value
    try:
        config_lib.validate(config)
        if config.data.task == "math":  # local paths, checked before anything heavy starts
            from dynamo_jax.math_task import require_math_paths

            require_math_paths(config)
    except config_lib.ConfigError as err:
        sys.exit(str(err))
    try:
        summary = trainer.train(config, _WORKDIR.value, progress=_PROGRESS.value)
    except trainer.USER_ERRORS as err:
        # Bad data, a model or tokenizer that cannot be read, a setting that cannot run: the
        # message names the file, row or field; the traceback would only bury it.
        if os.environ.get("DYNAMO_JAX_TRACEBACK"):
            raise
        sys.exit(f"error: {err}\n(set DYNAMO_JAX_TRACEBACK=1 to see the traceback)")
    before = summary.get("heldout_accuracy_before")
    after = summary.get("heldout_accuracy_after")
    if before is not None and after is not None and trainer.is_main_process():
        print(f"held-out accuracy: {before:.3f} before RL -> {after:.3f} after RL")


if __name__ == "__main__":
    from dynamo_jax import config as config_lib

    config_lib.exit_on_bad_command_line(sys.argv)
    app.run(main)
