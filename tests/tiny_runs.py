"""The settings every tiny end-to-end run of the embedded arithmetic task shares (a 32-wide
Qwen2-style model, 8 prompts x 4 rollouts, no early stop of the warm start); each test adds
its own sizes. Keys are dotted config paths, as `--config.<key>=<value>` takes them."""

TINY_ARITH = {
    "prompts_per_step": 8,
    "rollouts_per_prompt": 4,
    "allocation.n_low": 2,
    "allocation.n_high": 8,
    "model.architecture.hidden_size": 32,
    "model.architecture.intermediate_size": 64,
    "sft.target_accuracy": 0.0,
}


def as_flags(overrides: dict) -> list[str]:
    """`--config.<key>=<value>` flags for `python -m experiments.train`."""
    return [f"--config.{key}={value}" for key, value in overrides.items()]
