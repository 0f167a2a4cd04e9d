"""The configuration schema: every default in one place, and `validate(config)`.

`get_default_config()` returns an `ml_collections.ConfigDict` holding every field of SPEC sections
1-5 with its default. Experiment files in `configs/` start from it and override fields;
`validate(config)` is called before anything heavy starts and rejects unknown keys (with a
did-you-mean), wrong types and impossible combinations, naming the fields and values.

Field names follow the SPEC wording (`rollouts_per_prompt`, `allocation.n_low`, ...).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

# SPEC 2.3: the official "decay6" mode is the default; "decay5" is the alternative preset.
MODULATION_PRESETS: dict[str, dict[str, float]] = {
    "decay6": {"alpha": 0.2, "lambda_min": 0.6, "gamma": 50.0, "tau": 0.99},
    "decay5": {"alpha": 0.4, "lambda_min": 0.6, "gamma": 50.0, "tau": 0.9},
}

# Fields whose value must be one of a fixed set.
CHOICES: dict[str, tuple[Any, ...]] = {
    "allocation.mode": ("variance", "official", "uniform"),
    "allocation.refresh": ("step", "epoch"),
    "advantage.estimator": ("grpo", "dr_grpo", "rloo", "w_reinforce"),
    "loss.token_selection": ("none", "fork_tokens", "clip_cov", "kl_cov"),
    "modulation.expectation": ("sequence", "vocab"),
    "modulation.scope": ("micro_batch", "mini_batch"),
    "data.task": ("arithmetic", "math"),
    "data.source": ("jsonl", "parquet", "tfds"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "loss.kl_estimator": ("k1", "k2", "k3"),
    "loss.loss_agg": (
        "token_mean",
        "seq_mean_token_sum",
        "seq_mean_token_mean",
        "seq_mean_token_sum_norm",
    ),
}


def get_default_config() -> ml_collections.ConfigDict:
    """The defaults of SPEC sections 1-5 (the official 7B run)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # SPEC 5: N prompts per step, B = N * rollouts_per_prompt rollouts per step.
    c.prompts_per_step = 512
    c.rollouts_per_prompt = 16

    # SPEC 1: per-prompt history and variance-minimising allocation.
    c.allocation = ml_collections.ConfigDict()
    c.allocation.mode = "variance"
    c.allocation.refresh = "step"
    c.allocation.n_low = 8
    c.allocation.n_high = 24
    c.allocation.stats_decay = 1.0
    c.allocation.min_history = 4
    c.allocation.weight_exponent = 1.0
    # None means (1/4) ** weight_exponent: the weight of a prompt solved half the time.
    c.allocation.unexplored_weight = placeholder(float)
    c.allocation.min_weight = 0.0

    # SPEC 3: rewards and group advantages.
    c.advantage = ml_collections.ConfigDict()
    c.advantage.estimator = "grpo"
    c.advantage.correct_reward = 1.0
    c.advantage.incorrect_reward = -1.0
    c.advantage.eps = 1e-6
    # SPEC 6 baselines (docs/BASELINES.md; presets in dynamo_jax/baselines.py).
    c.advantage.positive_weight = 0.1  # estimator "w_reinforce": lambda on positive rewards
    c.advantage.entropy_shaping_k = 0.0  # Entropy Advantages: A + min(k H, |A| / kappa); 0 = off
    c.advantage.entropy_shaping_kappa = 2.0

    # SPEC 2: token-level advantage modulation.
    c.modulation = ml_collections.ConfigDict()
    c.modulation.comp = True
    c.modulation.stab = True
    c.modulation.alpha = MODULATION_PRESETS["decay6"]["alpha"]
    c.modulation.lambda_min = MODULATION_PRESETS["decay6"]["lambda_min"]
    c.modulation.gamma = MODULATION_PRESETS["decay6"]["gamma"]
    c.modulation.tau = MODULATION_PRESETS["decay6"]["tau"]
    c.modulation.expectation = "sequence"
    c.modulation.scope = "micro_batch"

    # SPEC 4: policy loss.
    c.loss = ml_collections.ConfigDict()
    c.loss.eps_low = 0.2
    c.loss.eps_high = 0.28
    c.loss.dual_clip = 10.0
    c.loss.kl_coef = 0.0
    c.loss.kl_estimator = "k3"
    c.loss.entropy_coef = 0.0
    c.loss.loss_agg = "token_mean"
    # SPEC 6 baselines: which tokens get special treatment, per micro-batch.
    # "fork_tokens": gradient only on the top loss.fork_fraction highest-entropy tokens;
    # "clip_cov": detach a random loss.cov_fraction of the tokens with covariance in
    # (loss.clip_cov_low, loss.clip_cov_high); "kl_cov": add loss.kl_cov_coef * |logp - old_logp|
    # on the loss.cov_fraction tokens of largest covariance (unclipped ratio loss elsewhere).
    c.loss.token_selection = "none"
    c.loss.fork_fraction = 0.2
    c.loss.cov_fraction = 2e-4
    c.loss.clip_cov_low = 1.0
    c.loss.clip_cov_high = 5.0
    c.loss.kl_cov_coef = 1.0
    # Tokens per chunk along the length axis when computing log-probs and entropy from hidden
    # states: bounds the [rows, chunk, vocab] float32 logits that exist at once.
    c.loss.logits_chunk_size = 128

    # SPEC 5 step 3: sampling.
    c.sampling = ml_collections.ConfigDict()
    c.sampling.temperature = 1.0
    c.sampling.top_p = 1.0
    c.sampling.top_k = 0  # 0 = off
    c.sampling.max_new_tokens = 3072
    # Rollouts decoded per sampler call (whole prompt groups are packed into calls of at most
    # this many rows, so only one call's KV cache exists at a time); 0 = the whole step at once.
    c.sampling.max_rows_per_call = 0

    # SPEC 5 step 7: optimiser updates.
    c.train = ml_collections.ConfigDict()
    c.train.num_minibatches = 16
    c.train.micro_batch_rows = 64
    c.train.num_steps = 500
    c.train.shuffle_rows = True

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.1
    c.optim.grad_clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    # SPEC 5 step 9.
    c.log_every = 1
    c.checkpoint_every = 50
    c.keep_checkpoints = 3

    # What is trained, on what, on which devices (not part of the algorithm).
    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # local Hugging Face folder; "" = random init from model.architecture
    c.model.architecture = ml_collections.ConfigDict()  # HF config.json fields (free-form)
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"  # master weights
    c.model.remat = False
    c.model.seed = 0

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # HF tokenizer folder or SentencePiece .model; "" = task's own

    c.data = ml_collections.ConfigDict()
    c.data.task = "arithmetic"  # "arithmetic" (synthetic, embedded) or "math" (files)
    c.data.num_train = 2000  # arithmetic: problems in the training set
    c.data.num_heldout = 200  # arithmetic: held-out problems
    c.data.seed = 0
    # data.task = "math": local files only (nothing is downloaded)
    c.data.source = "jsonl"  # jsonl | parquet | tfds
    c.data.train_path = ""  # file path (jsonl/parquet) or TFDS dataset name
    c.data.tfds_data_dir = ""  # TFDS data_dir holding the prepared dataset
    c.data.split = "train"  # TFDS split
    c.data.id_field = "id"
    c.data.prompt_field = "problem"
    c.data.answer_field = "answer"

    c.buckets = ml_collections.ConfigDict()
    c.buckets.prompt_len = (32, 64, 128, 256, 512, 1024, 2048)

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # RL steps between held-out evaluations; 0 = only before and after
    c.eval.num_prompts = 200
    c.eval.greedy = False
    c.eval.samples_per_prompt = 4  # Pass@1 = mean accuracy over these samples
    # data.task = "math": comma-separated name=path.jsonl benchmark files (AIME24=..., ...)
    c.eval.benchmarks = ""
    # Report pass@k and maj@k with k = this (<= samples_per_prompt; a larger k is reported as
    # pass@samples_per_prompt, with a note). The paper configs use 32 samples and pass@32.
    c.eval.pass_k = 4
    # Key of the held-out samples; -1 = derived from `seed`. Set it (e.g. 0) to score runs with
    # different RL seeds on the same held-out samples.
    c.eval.seed = -1

    c.sft = ml_collections.ConfigDict()  # supervised warm start (synthetic tasks)
    c.sft.steps = 0
    c.sft.num_examples = 6000  # synthetic tasks: size of the warm-start pool
    c.sft.batch_size = 64
    c.sft.learning_rate = 3e-3
    c.sft.target_accuracy = 0.0  # stop early once validation accuracy reaches this (0: never)
    c.sft.label_noise = 0.0  # synthetic tasks: share of warm-start answers with a wrong digit
    c.sft.eval_every = 50
    c.sft.seed = 0  # data order of the warm start (independent of the RL `seed`)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # "" = single process (or auto-detected cluster)
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c


# Sections whose keys are free-form (passed through to another library).
FREEFORM = ("model.architecture",)


def apply_modulation_preset(config: ml_collections.ConfigDict, name: str) -> None:
    """Set alpha / lambda_min / gamma / tau from a named preset ("decay6", "decay5")."""
    if name not in MODULATION_PRESETS:
        raise ValueError(
            f"Unknown modulation preset {name!r}; choose one of {sorted(MODULATION_PRESETS)}."
        )
    for key, value in MODULATION_PRESETS[name].items():
        config.modulation[key] = value


class ConfigError(ValueError):
    """A config that cannot run; the message names the fields and values involved."""


def _as_dict(cfg: Any) -> Any:
    if isinstance(cfg, ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
        return cfg.to_dict()
    return cfg


def _check_schema(value: Any, default: Any, path: str, errors: list[str]) -> None:
    """Recursive structural check of `value` against the default schema."""
    if path in FREEFORM:
        if not isinstance(value, Mapping):
            errors.append(f"{path}: expected a section (dict), got {value!r}")
        return
    if isinstance(default, Mapping):
        if not isinstance(value, Mapping):
            errors.append(f"{path or 'config'}: expected a section (dict), got {value!r}")
            return
        for key in value:
            sub = f"{path}.{key}" if path else str(key)
            if key not in default:
                close = difflib.get_close_matches(str(key), [str(k) for k in default], n=1)
                prefix = f"{path}." if path else ""
                hint = f" Did you mean {prefix + close[0]!r}?" if close else ""
                errors.append(
                    f"Unknown config field {sub!r}."
                    + hint
                    + f" Known fields here: {sorted(default)}."
                )
                continue
            _check_schema(value[key], default[key], sub, errors)
        return
    if default is None:  # placeholder fields: None or a number
        if value is not None and not _is_number(value):
            errors.append(f"{path}: expected a number or None, got {value!r}")
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true/false, got {value!r} ({type(value).__name__})")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {value!r} ({type(value).__name__})")
    elif isinstance(default, float):
        if not _is_number(value):
            errors.append(f"{path}: expected a number, got {value!r} ({type(value).__name__})")
        elif not math.isfinite(float(value)):
            errors.append(f"{path}: must be finite, got {value!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r} ({type(value).__name__})")
    elif isinstance(default, tuple | list):
        if not isinstance(value, tuple | list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            errors.append(f"{path}: expected a list of integers, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate(config: Any, schema: Any = None) -> None:
    """Raise `ConfigError` listing every problem in `config`, or return None.

    Checks: no unknown keys (anywhere), types match the defaults, enumerated fields hold a
    permitted value, numeric ranges, and cross-field feasibility such as
    N * n_low <= B <= N * n_high (SPEC 1.3).
    """
    cfg = _as_dict(config)
    default = _as_dict(schema if schema is not None else get_default_config())
    errors: list[str] = []
    _check_schema(cfg, default, "", errors)
    if errors:  # range checks below assume the structure is right
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(errors))

    def get(path: str) -> Any:
        node = cfg
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return _lookup(default, path)
            node = node[part]
        return node

    for path, allowed in CHOICES.items():
        if get(path) not in allowed:
            errors.append(f"{path} = {get(path)!r}; choose one of {list(allowed)}.")

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

    n_prompts, n = get("prompts_per_step"), get("rollouts_per_prompt")
    n_low, n_high = get("allocation.n_low"), get("allocation.n_high")
    need(n_prompts >= 1, f"prompts_per_step = {n_prompts} must be >= 1.")
    need(n >= 1, f"rollouts_per_prompt = {n} must be >= 1.")
    need(n_low >= 1, f"allocation.n_low = {n_low} must be >= 1.")
    need(
        n_low <= n_high,
        f"allocation.n_low = {n_low} is larger than allocation.n_high = {n_high}.",
    )
    budget = n_prompts * n
    if get("allocation.mode") != "uniform":
        need(
            n_prompts * n_low <= budget <= n_prompts * n_high,
            "The rollout budget B = prompts_per_step * rollouts_per_prompt = "
            f"{n_prompts} * {n} = {budget} must lie in [prompts_per_step * allocation.n_low, "
            f"prompts_per_step * allocation.n_high] = [{n_prompts * n_low}, "
            f"{n_prompts * n_high}]: set allocation.n_low <= {n} <= allocation.n_high.",
        )
    if get("allocation.mode") == "official":
        # SPEC 1.3: before any history every prompt gets min(max(n_low, 4), n_high) rollouts.
        from dynamo_jax.allocation import OFFICIAL_MIN_HISTORY

        first = min(max(n_low, OFFICIAL_MIN_HISTORY), n_high)
        need(
            n >= first,
            f"allocation.mode = 'official' gives every prompt without history "
            f"min(max(allocation.n_low, {OFFICIAL_MIN_HISTORY}), allocation.n_high) = {first} "
            f"rollouts, so the first step needs rollouts_per_prompt >= {first} (got {n}): "
            f"raise rollouts_per_prompt or lower allocation.n_high.",
        )
    decay = get("allocation.stats_decay")
    need(0.0 < decay <= 1.0, f"allocation.stats_decay = {decay} must be in (0, 1].")
    need(
        get("allocation.min_history") >= 2,
        f"allocation.min_history = {get('allocation.min_history')} must be >= 2 "
        "(the variance needs two outcomes).",
    )
    need(get("allocation.weight_exponent") >= 0, "allocation.weight_exponent must be >= 0.")
    need(get("allocation.min_weight") >= 0, "allocation.min_weight must be >= 0.")
    uw = get("allocation.unexplored_weight")
    need(uw is None or uw >= 0, f"allocation.unexplored_weight = {uw} must be >= 0 or None.")

    need(get("advantage.eps") > 0, "advantage.eps must be > 0.")
    need(get("advantage.positive_weight") >= 0, "advantage.positive_weight must be >= 0.")
    need(get("advantage.entropy_shaping_k") >= 0, "advantage.entropy_shaping_k must be >= 0.")
    kappa = get("advantage.entropy_shaping_kappa")
    need(
        kappa > 1,
        f"advantage.entropy_shaping_kappa = {kappa} must be > 1: the bonus min(k H, |A| / kappa) "
        "keeps a negative advantage negative only then (SPEC 6 uses 2).",
    )
    for field in ("loss.fork_fraction", "loss.cov_fraction"):
        need(0.0 < get(field) <= 1.0, f"{field} = {get(field)} must be in (0, 1].")
    need(
        get("loss.clip_cov_low") < get("loss.clip_cov_high"),
        f"loss.clip_cov_low = {get('loss.clip_cov_low')} must be below "
        f"loss.clip_cov_high = {get('loss.clip_cov_high')}.",
    )
    need(get("loss.kl_cov_coef") >= 0, "loss.kl_cov_coef must be >= 0.")
    cr, ir = get("advantage.correct_reward"), get("advantage.incorrect_reward")
    need(
        cr > ir,
        f"advantage.correct_reward = {cr} must be above advantage.incorrect_reward = {ir} "
        "(equal: every advantage is 0; below: RL would push towards wrong answers).",
    )
    need(
        get("advantage.estimator") != "w_reinforce" or ir < 0,
        f"advantage.estimator = w_reinforce needs advantage.incorrect_reward < 0 (got {ir}): its "
        "advantage is the reward itself for wrong answers (no baseline), so a reward of 0 drops "
        "the negative samples the method is built on.",
    )

    need(get("modulation.alpha") >= 0, f"modulation.alpha = {get('modulation.alpha')} < 0.")
    lmin = get("modulation.lambda_min")
    need(0.0 <= lmin <= 1.0, f"modulation.lambda_min = {lmin} must be in [0, 1].")
    need(get("modulation.gamma") > 0, "modulation.gamma must be > 0.")
    tau = get("modulation.tau")
    need(
        0.0 < tau <= 1.0,
        f"modulation.tau = {tau} must be in (0, 1]: x = Xi / max Xi lies in [0, 1], so a tau "
        "outside it damps every token alike (tau <= 0) or none (tau > 1).",
    )

    eps_low, eps_high = get("loss.eps_low"), get("loss.eps_high")
    # 1 puts the lower clip at a ratio of 0, i.e. off (Clip-Cov's authors run it so).
    need(0.0 <= eps_low <= 1.0, f"loss.eps_low = {eps_low} must be in [0, 1].")
    need(eps_high >= 0.0, f"loss.eps_high = {eps_high} must be >= 0.")
    need(
        get("loss.dual_clip") > 1.0,
        f"loss.dual_clip = {get('loss.dual_clip')} must be > 1 (dual clip c; 10 by default).",
    )
    need(get("loss.kl_coef") >= 0, "loss.kl_coef must be >= 0.")
    need(get("loss.logits_chunk_size") >= 1, "loss.logits_chunk_size must be >= 1.")

    need(get("sampling.temperature") > 0, "sampling.temperature must be > 0.")
    top_p = get("sampling.top_p")
    need(0.0 < top_p <= 1.0, f"sampling.top_p = {top_p} must be in (0, 1].")
    need(get("sampling.top_k") >= 0, "sampling.top_k must be >= 0 (0 = off).")
    need(get("sampling.max_new_tokens") >= 1, "sampling.max_new_tokens must be >= 1.")
    max_rows = get("sampling.max_rows_per_call")
    largest_group = n if get("allocation.mode") == "uniform" else n_high
    need(
        max_rows == 0 or max_rows >= largest_group,
        f"sampling.max_rows_per_call = {max_rows} is smaller than the largest group a prompt can "
        f"get ({largest_group}: allocation.n_high, or rollouts_per_prompt when uniform); "
        "use 0 (one call) or at least that.",
    )

    mb = get("train.num_minibatches")
    need(mb >= 1, f"train.num_minibatches = {mb} must be >= 1.")
    if mb >= 1:
        need(
            budget % mb == 0,
            f"The rollout budget B = {budget} rows (prompts_per_step * rollouts_per_prompt) "
            f"must split into train.num_minibatches = {mb} equal optimiser updates.",
        )
        rows_per_update = budget // mb
        mbr = get("train.micro_batch_rows")
        need(mbr >= 1, f"train.micro_batch_rows = {mbr} must be >= 1.")
        if mbr >= 1 and rows_per_update >= 1:
            need(
                rows_per_update % mbr == 0,
                f"Each optimiser update holds B / train.num_minibatches = {budget} / {mb} = "
                f"{rows_per_update} rows, which train.micro_batch_rows = {mbr} must divide.",
            )
    need(get("train.num_steps") >= 0, "train.num_steps must be >= 0.")
    need(get("optim.learning_rate") >= 0, "optim.learning_rate must be >= 0.")
    need(get("optim.warmup_steps") >= 0, "optim.warmup_steps must be >= 0.")
    need(get("optim.grad_clip_norm") > 0, "optim.grad_clip_norm must be > 0.")
    need(get("checkpoint_every") >= 1, "checkpoint_every must be >= 1.")
    need(get("keep_checkpoints") >= 1, "keep_checkpoints must be >= 1.")
    need(get("log_every") >= 1, "log_every must be >= 1.")
    mesh_sizes = [get("mesh.data"), get("mesh.fsdp"), get("mesh.tensor")]
    need(
        all(v == -1 or v >= 1 for v in mesh_sizes) and mesh_sizes.count(-1) <= 1,
        f"mesh (data, fsdp, tensor) = {tuple(mesh_sizes)}: each must be >= 1, at most one -1.",
    )
    need(len(get("buckets.prompt_len")) >= 1, "buckets.prompt_len must list >= 1 length.")
    noise = get("sft.label_noise")
    need(0.0 <= noise < 1.0, f"sft.label_noise = {noise} must be in [0, 1).")
    need(get("sft.steps") >= 0, f"sft.steps = {get('sft.steps')} must be >= 0 (0: no warm start).")
    need(get("sft.batch_size") >= 1, f"sft.batch_size = {get('sft.batch_size')} must be >= 1.")
    need(get("sft.eval_every") >= 1, f"sft.eval_every = {get('sft.eval_every')} must be >= 1.")
    need(get("eval.samples_per_prompt") >= 1, "eval.samples_per_prompt must be >= 1.")
    need(get("eval.num_prompts") >= 1, "eval.num_prompts must be >= 1.")
    need(get("eval.pass_k") >= 1, f"eval.pass_k = {get('eval.pass_k')} must be >= 1.")
    need(get("eval.every") >= 0, f"eval.every = {get('eval.every')} must be >= 0 (0: start/end).")
    for field in ("optim.b1", "optim.b2"):
        need(0.0 <= get(field) < 1.0, f"{field} = {get(field)} must be in [0, 1) (Adam).")
    need(get("optim.eps") > 0, f"optim.eps = {get('optim.eps')} must be > 0.")
    need(get("optim.weight_decay") >= 0, "optim.weight_decay must be >= 0.")
    need(get("loss.entropy_coef") >= 0, "loss.entropy_coef must be >= 0 (a bonus; 0 = off).")
    bad = [b for b in get("buckets.prompt_len") if b < 1]
    need(not bad, f"buckets.prompt_len = {list(get('buckets.prompt_len'))}: lengths must be >= 1.")
    for field in ("data.seed", "sft.seed"):
        need(get(field) >= 0, f"{field} = {get(field)} must be >= 0.")
    need(get("distributed.num_processes") >= 0, "distributed.num_processes must be >= 0 (0: auto).")
    if get("data.task") == "arithmetic":
        need(get("data.num_heldout") >= 1, "data.num_heldout must be >= 1 (the held-out set).")
    if get("sft.steps") > 0:
        need(get("sft.learning_rate") > 0, "sft.learning_rate must be > 0 when sft.steps > 0.")
        if get("data.task") == "arithmetic":
            need(
                get("sft.num_examples") >= 1,
                "sft.num_examples must be >= 1: the warm start would train on the RL prompts.",
            )
    ta = get("sft.target_accuracy")
    need(0.0 <= ta <= 1.0, f"sft.target_accuracy = {ta} must be in [0, 1] (0: no early stop).")

    if errors:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(errors))


def _lookup(tree: Mapping, path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        node = node[part]
    return node


def _field_names(tree: Mapping, prefix: str = "") -> list[str]:
    names = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        names.append(name)
        if isinstance(value, Mapping):
            names += _field_names(value, name + ".")
    return names


def load_config_file(spec: str, flag: str = "config") -> ml_collections.ConfigDict:
    """`get_config()` of the config file `spec` ("path.py" or "path.py:argument"), with a
    ConfigError naming the file (and line) when it is missing, does not parse, raises, or
    defines no get_config()."""
    import importlib.util
    import os
    import traceback

    path, arg = spec, None
    if not os.path.isfile(path) and ":" in spec:
        path, arg = spec.rsplit(":", 1)
    where = f"--{flag} {spec}"
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such file (give the path of a Python config file).")

    def failed(err: BaseException, doing: str) -> ConfigError:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == path]
        line = f" (line {frames[-1].lineno})" if frames else ""
        return ConfigError(f"{where}: {doing} raised {type(err).__name__}{line}: {err}")

    try:
        module_spec = importlib.util.spec_from_file_location("_checked_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ConfigError(f"{where}: line {err.lineno}: syntax error: {err.msg}") from None
    except Exception as err:
        raise failed(err, "loading it") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"{where}: the file defines no get_config() function.")
    try:
        return module.get_config() if arg is None else module.get_config(arg)
    except Exception as err:
        raise failed(err, "get_config()") from None


def check_config_args(argv: list[str], flag: str = "config") -> None:
    """Check a command line's `--config FILE` and `--config.<field>=value` overrides before
    absl parses them (which reports a misspelled field as a long KeyError traceback): raise a
    ConfigError naming the file or the field, with the closest known field names."""
    args = list(argv[1:])
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in args):
        return
    spec, fields = None, []
    for i, a in enumerate(args):
        if a == f"--{flag}" and i + 1 < len(args):
            spec = args[i + 1]
        elif a.startswith(f"--{flag}="):
            spec = a.split("=", 1)[1]
        elif a.startswith((f"--{flag}.", f"--no{flag}.")):
            fields.append(a.split("=", 1)[0].split(".", 1)[1])
    if spec is None:
        return  # absl reports the missing required flag
    config = load_config_file(spec, flag)
    errors = [f"--{flag}.{name}: {e}" for name in fields if (e := unknown_field(config, name))]
    if errors:
        raise ConfigError("\n".join(errors))


def exit_on_bad_command_line(argv: list[str]) -> None:
    """`check_config_args` for an entry point: a missing config file or a misspelled
    --config.<field> exits with its one-line message instead of absl's traceback."""
    try:
        check_config_args(argv)
    except ConfigError as err:
        raise SystemExit(str(err)) from None


def unknown_field(config: Any, name: str, prefix: str = "--config.") -> str | None:
    """None when the dotted `name` is a field (or section) of `config`; otherwise "no such
    config field" with the closest field names (written `prefix + name`) and the fields of
    its section, for a message that names the flag."""
    tree = _as_dict(config)
    node: Any = tree
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            names = _field_names(tree)
            leaves = [n for n in names if not isinstance(_lookup(tree, n), Mapping)]
            close = difflib.get_close_matches(name, leaves, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            section = name.rsplit(".", 1)[0] if "." in name else ""
            fields_here = sorted(_lookup(tree, section)) if section in names else None
            listing = f" Fields of {section}: {fields_here}." if fields_here else ""
            return f"no such config field.{hint}{listing}"
        node = node[part]
    return None
