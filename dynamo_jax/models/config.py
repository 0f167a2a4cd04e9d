"""ModelConfig: the static description of one decoder, built from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3")

_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class UnsupportedConfigError(ValueError):
    """A config.json field has a value this model family does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape/numerics description of a Qwen2/Qwen2.5, Llama 3 or Qwen3 decoder.

    Frozen and hashable so it can be a static jit argument. ``rope_scaling`` holds the llama3
    parameters as a sorted tuple of (name, value) pairs (None for plain RoPE). ``hf_extra`` keeps
    the original config.json (not hashed, not compared) so save_pretrained writes it back.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    hf_extra: Mapping[str, Any] | None = dataclasses.field(
        default=None, compare=False, hash=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type={self.model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedConfigError(f"head_dim={self.head_dim} must be even for RoPE")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a parsed Hugging Face config.json.

        Accepts both the transformers<5 layout (``rope_theta`` + ``rope_scaling``) and the
        transformers 5 layout (``rope_parameters``). Raises UnsupportedConfigError naming the
        offending field for anything this implementation would silently get wrong.
        """
        d = dict(d)
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise UnsupportedConfigError(
                f"the model config lacks {', '.join(missing)} (a transformers config.json "
                f"holds {', '.join(required)})"
            )
        if int(d["num_hidden_layers"]) < 1:
            raise UnsupportedConfigError(
                f"num_hidden_layers={d['num_hidden_layers']}: a model needs at least one layer"
            )
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type={model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
        if d.get("use_sliding_window"):
            raise UnsupportedConfigError("use_sliding_window=True is not supported")
        layer_types = d.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise UnsupportedConfigError(
                f"layer_types={sorted(set(layer_types))} is not supported (only full_attention)"
            )
        if d.get("mlp_bias"):
            raise UnsupportedConfigError("mlp_bias=True is not supported")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise UnsupportedConfigError("pretraining_tp != 1 is not supported")
        if d.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):  # transformers < 5 layout
            raise UnsupportedConfigError(
                f"partial_rotary_factor={d['partial_rotary_factor']} is not supported (only 1.0)"
            )

        rope_theta, rope_scaling = _parse_rope(d)
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        head_dim = d.get("head_dim") or hidden // num_heads
        if not d.get("head_dim") and (hidden % num_heads or head_dim % 2):
            raise UnsupportedConfigError(
                f"hidden_size={hidden} / num_attention_heads={num_heads} must be a whole, even "
                f"head size (RoPE rotates pairs), got {hidden / num_heads:g}"
            )
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            # transformers' class default for all three families is False.
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            hf_extra=d,
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> ModelConfig:
        """Reads ``path/config.json`` (or ``path`` itself if it is the json file)."""
        path = os.fspath(path)
        file = path if path.endswith(".json") else os.path.join(path, "config.json")
        with open(file) as f:
            try:
                return cls.from_hf_dict(json.load(f))
            except (UnsupportedConfigError, json.JSONDecodeError) as err:
                raise UnsupportedConfigError(f"{file}: {err}") from None

    # ------------------------------------------------------------------ export
    def to_hf_dict(self, dtype_name: str = "float32") -> dict[str, Any]:
        """config.json contents transformers can load (original extra fields are kept)."""
        if self.model_type == "qwen2":
            representable = self.qkv_bias and not self.o_bias and not self.qk_norm
        else:
            representable = self.qkv_bias == self.o_bias and self.qk_norm == (
                self.model_type == "qwen3"
            )
        if not representable:
            raise UnsupportedConfigError(
                f"model_type={self.model_type!r} cannot express qkv_bias={self.qkv_bias}, "
                f"o_bias={self.o_bias}, qk_norm={self.qk_norm} in a transformers config"
            )
        d: dict[str, Any] = dict(self.hf_extra or {})
        rope_parameters: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope_parameters.update(dict(self.rope_scaling), rope_type="llama3")
        d.update(
            architectures=[_ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            dtype=dtype_name,
        )
        # Written in both layouts so transformers 4.x and 5.x read the same RoPE.
        d["rope_parameters"] = rope_parameters
        d["rope_theta"] = self.rope_theta
        d["rope_scaling"] = (
            None if self.rope_scaling is None else dict(rope_parameters, type="llama3")
        )
        d.pop("torch_dtype", None)
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
        return d

    # ------------------------------------------------------------------ derived
    @property
    def num_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2], float32, computed as transformers does."""
        dim = self.head_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv = (1.0 / (np.float32(self.rope_theta) ** exponent)).astype(np.float32)
        if self.rope_scaling is None:
            return inv
        p = dict(self.rope_scaling)
        factor = p["factor"]
        low, high = p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)


def _parse_rope(d: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, llama3 scaling params or None) from either config layout."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if isinstance(params, Mapping) and params:
        if any(isinstance(v, Mapping) for v in params.values()):
            raise UnsupportedConfigError("per-layer-type rope_parameters are not supported")
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        rope = dict(params)
        field = "rope_parameters"
    else:
        theta = d.get("rope_theta", 10000.0)
        rope = dict(scaling) if scaling else {}
        field = "rope_scaling"
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"{field}.rope_type={rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedConfigError(f"{field}.partial_rotary_factor != 1.0 is not supported")
    if rope_type == "default":
        return theta, None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in rope]
    if missing:
        raise UnsupportedConfigError(f"{field} (llama3) is missing {missing}")
    return theta, tuple(sorted((k, rope[k]) for k in keys))
