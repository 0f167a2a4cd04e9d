"""Prompt templates: the Qwen2.5-Math chain-of-thought prompt.  [host]

The prompt is a system message asking for a boxed final answer plus the problem as the user turn,
rendered by the tokenizer's own chat template (HF ``apply_chat_template``). Tokenizers without a
chat template (e.g. a bare SentencePiece model) get a plain-text format instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

# What Qwen2.5's ChatML template renders for [system, user] + generation prompt.
CHATML_TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# For tokenizers without special chat tokens.
PLAIN_TEMPLATE = "{system}\n\nProblem: {problem}\n\nSolution:"


class ChatTokenizer(Protocol):
    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> Any: ...


def build_messages(problem: str, system: str | None = QWEN_MATH_SYSTEM) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": problem})
    return messages


def _has_chat_template(tokenizer: Any) -> bool:
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
        return False
    # HF tokenizers expose the attribute and raise from apply_chat_template when it is None.
    return getattr(tokenizer, "chat_template", True) is not None


def format_prompt(
    tokenizer: ChatTokenizer | None,
    problem: str,
    *,
    system: str | None = QWEN_MATH_SYSTEM,
    fallback: str = PLAIN_TEMPLATE,
) -> str:
    """The text to tokenise for one problem (generation prompt included).

    Uses ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``
    when the tokenizer has a chat template, else ``fallback.format(system=..., problem=...)``.
    """
    if _has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            build_messages(problem, system), tokenize=False, add_generation_prompt=True
        )
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text
    return fallback.format(system=system or "", problem=problem).lstrip()


def format_prompts(
    tokenizer: ChatTokenizer | None,
    records: Sequence[dict[str, str]],
    **kwargs: Any,
) -> list[str]:
    """`format_prompt` over records' ``"prompt"`` fields."""
    return [format_prompt(tokenizer, r["prompt"], **kwargs) for r in records]
