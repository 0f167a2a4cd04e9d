"""Verifiable rewards. `math`: boxed-answer extraction, equivalence, time-limited verifier pool."""

from dynamo_jax.rewards.math import (
    STATUSES,
    MathVerifier,
    VerifyResult,
    extract_answer,
    is_equivalent,
    normalize_answer,
    rewards,
    score_answer,
)

__all__ = [
    "STATUSES",
    "MathVerifier",
    "VerifyResult",
    "extract_answer",
    "is_equivalent",
    "normalize_answer",
    "rewards",
    "score_answer",
]
