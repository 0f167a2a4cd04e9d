"""Flax NNX decoder family (Qwen2/Qwen2.5, Llama 3, Qwen3) with KV-cache decode and HF I/O.

See ``dynamo_jax.models.transformer`` for the call/decode API, the KV-cache layout and the
padding convention, and docs/MODELS.md for what is supported.
"""

from dynamo_jax.models.config import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    UnsupportedConfigError,
)
from dynamo_jax.models.hf_io import SafetensorsFolder, load_pretrained, save_pretrained
from dynamo_jax.models.transformer import (
    CACHE_LOGICAL_AXES,
    KVCache,
    Transformer,
    init_model,
)

__all__ = [
    "CACHE_LOGICAL_AXES",
    "KVCache",
    "ModelConfig",
    "SUPPORTED_MODEL_TYPES",
    "SafetensorsFolder",
    "Transformer",
    "UnsupportedConfigError",
    "init_model",
    "load_pretrained",
    "save_pretrained",
]
