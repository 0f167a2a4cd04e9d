"""Data: prompt sources (JSONL, Parquet, TFDS) -> {id, prompt, answer}, templates, iterator."""

from dynamo_jax.data.iterator import PromptIterator
from dynamo_jax.data.sources import (
    DEFAULT_FIELDS,
    DataError,
    JsonlSource,
    ParquetSource,
    TfdsSource,
    load_records,
)
from dynamo_jax.data.templates import (
    CHATML_TEMPLATE,
    PLAIN_TEMPLATE,
    QWEN_MATH_SYSTEM,
    build_messages,
    format_prompt,
    format_prompts,
)

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_FIELDS",
    "PLAIN_TEMPLATE",
    "QWEN_MATH_SYSTEM",
    "DataError",
    "JsonlSource",
    "ParquetSource",
    "PromptIterator",
    "TfdsSource",
    "build_messages",
    "format_prompt",
    "format_prompts",
    "load_records",
]
