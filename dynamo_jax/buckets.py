"""Bucketed shapes for sampling: which static dims a step compiles for, and the row index arrays.

Host-side, plain numpy. A sampling step has four static dims and nothing else that the compiler
sees::

    num_prompt_slots   unique prompts, rounded up to a prompt-count bucket   (prefill batch)
    prompt_len         longest prompt, rounded up to a prompt-length bucket  (prefill length)
    num_rows           sum_i n_i, rounded up to a row bucket                 (decode batch)
    max_new_tokens     fixed per BucketSpec                                  (decode length)

Changing the allocation n_i only changes the *index arrays* of a ``SamplingPlan`` (which prompt
slot each row reads, its sample index, its group, whether it is real), so the number of compiled
programs is bounded by the bucket grid. Nothing is ever truncated to fit a bucket: a value above
the largest bucket is a ``ValueError`` naming both.

Row layout (contract, tested): rows of prompt i are contiguous and come in prompt order; row
``sum_{j<i} n_j + s`` has ``row_to_prompt = i``, ``sample_index = sample_offsets[i] + s``,
``group_id = i`` and ``prompt_id = prompt_ids[i]``. Padding rows follow the real rows, point at
prompt slot 0, have ``sample_index = 0``, ``group_id = 0``, ``prompt_id = -1`` and
``valid = False``. Padding prompt slots (``i >= num_prompts``) hold pad tokens and length 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "BucketSpec",
    "SamplingPlan",
    "choose",
    "choose_multiple",
    "pad_prompts",
    "plan",
]

Buckets = int | tuple[int, ...]


def choose(value: int, buckets: Sequence[int], what: str = "value") -> int:
    """Smallest bucket >= value.

    Raises:
      ValueError: naming ``value`` and the largest bucket when nothing fits (we never truncate).
    """
    value = int(value)
    fits = [int(b) for b in buckets if int(b) >= value]
    if not fits:
        raise ValueError(
            f"{what} {value} does not fit any bucket: the largest is {max(buckets)} "
            f"(buckets {tuple(buckets)}); add a larger bucket rather than truncating"
        )
    return min(fits)


def choose_multiple(value: int, buckets: Buckets, multiple_of: int = 1, what: str = "value") -> int:
    """Bucket for ``value`` when buckets are either a tuple or "any multiple of m" (an int).

    The result is then rounded up to a multiple of ``multiple_of`` (e.g. the number of batch
    shards of a mesh, so a bucket always splits evenly over devices).
    """
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    if isinstance(buckets, int):
        if buckets < 1:
            raise ValueError(f"bucket multiple for {what} must be >= 1, got {buckets}")
        size = max(1, math.ceil(value / buckets)) * buckets
    else:
        size = choose(max(value, 1), buckets, what)
    return math.ceil(size / multiple_of) * multiple_of


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    """The grid of static sampling shapes.

    Attributes:
      prompt_len_buckets: allowed padded prompt lengths (tokens); the longest prompt must fit.
      row_buckets: allowed row counts: a tuple, or an int m meaning "any multiple of m".
      prompt_count_buckets: allowed unique-prompt counts (prefill batch): tuple or multiple.
      max_new_tokens: response length bound; the KV cache has prompt_len + max_new_tokens slots.
    """

    prompt_len_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
    row_buckets: Buckets = 64
    prompt_count_buckets: Buckets = 8
    max_new_tokens: int = 1024

    def __post_init__(self) -> None:
        if not self.prompt_len_buckets or min(self.prompt_len_buckets) < 1:
            raise ValueError(f"prompt_len_buckets must be positive, got {self.prompt_len_buckets}")
        for name in ("row_buckets", "prompt_count_buckets"):
            b = getattr(self, name)
            if isinstance(b, int):
                if b < 1:
                    raise ValueError(f"{name} multiple must be >= 1, got {b}")
            elif not b or min(b) < 1:
                raise ValueError(f"{name} must be positive, got {b}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclasses.dataclass(frozen=True, eq=False)
class SamplingPlan:
    """Static dims + per-row index arrays of one sampling call (see the module docstring).

    Attributes (R = num_rows, N = num_prompts real prompts, N <= num_prompt_slots):
      num_prompt_slots, prompt_len, num_rows, max_new_tokens: the static dims.
      num_prompts: N; num_valid_rows: sum_i n_i.
      group_sizes: [N] int64, n_i; sample_offsets: [N] int64, first sample index per prompt.
      row_to_prompt: [R] int32 prompt slot of each row.
      sample_index: [R] int32 index of the row within its group (plus the prompt's offset).
      group_id: [R] int32 the prompt's position in this step's batch, in [0, N).
      prompt_id: [R] int64 dataset id of the row's prompt (-1 on padding rows).
      valid: [R] bool, False on padding rows.
    """

    num_prompt_slots: int
    prompt_len: int
    num_rows: int
    max_new_tokens: int
    num_prompts: int
    num_valid_rows: int
    group_sizes: np.ndarray
    sample_offsets: np.ndarray
    row_to_prompt: np.ndarray
    sample_index: np.ndarray
    group_id: np.ndarray
    prompt_id: np.ndarray
    valid: np.ndarray

    @property
    def static_dims(self) -> tuple[int, int, int, int]:
        """(num_prompt_slots, prompt_len, num_rows, max_new_tokens): what a compile depends on."""
        return (self.num_prompt_slots, self.prompt_len, self.num_rows, self.max_new_tokens)


def plan(
    prompt_ids: Sequence[int] | np.ndarray,
    prompt_lengths: Sequence[int] | np.ndarray,
    group_sizes: Sequence[int] | np.ndarray,
    spec: BucketSpec,
    *,
    sample_offsets: Sequence[int] | np.ndarray | None = None,
    multiple_of: int = 1,
) -> SamplingPlan:
    """Buckets one step's prompts and allocation into static dims + row index arrays.

    Args:
      prompt_ids: [N] dataset ids (any int64; need not be unique, but (prompt_id, sample_index)
        pairs are what seeds a row's randomness).
      prompt_lengths: [N] token counts, each >= 1.
      group_sizes: [N] n_i >= 0 rows per prompt.
      spec: the bucket grid.
      sample_offsets: [N] first sample index per prompt (default 0): lets one prompt's samples
        be drawn over several calls (e.g. pass@k in chunks) without repeating randomness.
      multiple_of: slots and rows are rounded up to a multiple of this (mesh batch shards).

    Returns:
      A SamplingPlan.
    """
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    lengths = np.asarray(prompt_lengths, dtype=np.int64).reshape(-1)
    sizes = np.asarray(group_sizes, dtype=np.int64).reshape(-1)
    n = ids.shape[0]
    if n == 0:
        raise ValueError("plan needs at least one prompt")
    if lengths.shape[0] != n or sizes.shape[0] != n:
        raise ValueError(
            f"prompt_ids ({n}), prompt_lengths ({lengths.shape[0]}) and group_sizes "
            f"({sizes.shape[0]}) must have the same length"
        )
    if (lengths < 1).any():
        bad = int(np.flatnonzero(lengths < 1)[0])
        raise ValueError(f"prompt {bad} (id {ids[bad]}) is empty; every prompt needs >= 1 token")
    if (sizes < 0).any():
        raise ValueError(f"group sizes must be >= 0, got {sizes[sizes < 0][:5].tolist()}")
    offsets = (
        np.zeros(n, np.int64)
        if sample_offsets is None
        else np.asarray(sample_offsets, dtype=np.int64).reshape(-1)
    )
    if offsets.shape[0] != n or (offsets < 0).any():
        raise ValueError("sample_offsets must be [N] non-negative integers")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")

    longest = int(lengths.max())
    prompt_len = choose(longest, spec.prompt_len_buckets, "prompt length")
    slots = choose_multiple(n, spec.prompt_count_buckets, multiple_of, "number of prompts")
    total = int(sizes.sum())
    rows = choose_multiple(max(total, 1), spec.row_buckets, multiple_of, "number of rows")

    group = np.repeat(np.arange(n, dtype=np.int64), sizes)  # [total]
    starts = np.cumsum(sizes) - sizes
    within = np.arange(total, dtype=np.int64) - np.repeat(starts, sizes)

    row_to_prompt = np.zeros(rows, np.int32)
    sample_index = np.zeros(rows, np.int32)
    group_id = np.zeros(rows, np.int32)
    prompt_id = np.full(rows, -1, np.int64)
    valid = np.zeros(rows, bool)
    row_to_prompt[:total] = group
    group_id[:total] = group
    sample_index[:total] = offsets[group] + within
    prompt_id[:total] = ids[group]
    valid[:total] = True
    return SamplingPlan(
        num_prompt_slots=slots,
        prompt_len=prompt_len,
        num_rows=rows,
        max_new_tokens=spec.max_new_tokens,
        num_prompts=n,
        num_valid_rows=total,
        group_sizes=sizes,
        sample_offsets=offsets,
        row_to_prompt=row_to_prompt,
        sample_index=sample_index,
        group_id=group_id,
        prompt_id=prompt_id,
        valid=valid,
    )


def pad_prompts(
    token_lists: Sequence[Sequence[int]],
    prompt_len: int,
    pad_id: int,
    num_slots: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads prompts into a [slots, prompt_len] int32 array.

    Args:
      token_lists: N token-id lists.
      prompt_len: padded length; a longer prompt raises ValueError (never truncated).
      pad_id: fill value.
      num_slots: rows of the result (>= N; default N); extra slots are all pad with length 0.

    Returns:
      (tokens [slots, prompt_len] int32, lengths [slots] int32).
    """
    n = len(token_lists)
    slots = n if num_slots is None else int(num_slots)
    if slots < n:
        raise ValueError(f"num_slots={slots} < number of prompts {n}")
    tokens = np.full((slots, prompt_len), pad_id, np.int32)
    lengths = np.zeros(slots, np.int32)
    for i, toks in enumerate(token_lists):
        toks = np.asarray(toks, dtype=np.int64).reshape(-1)
        if toks.shape[0] > prompt_len:
            raise ValueError(
                f"prompt {i} has {toks.shape[0]} tokens, more than prompt_len={prompt_len}"
            )
        tokens[i, : toks.shape[0]] = toks
        lengths[i] = toks.shape[0]
    return tokens, lengths
