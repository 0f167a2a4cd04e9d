"""One tokenizer interface over a local Hugging Face tokenizer folder or a SentencePiece model.

    tok = load_tokenizer(path)        # folder with tokenizer.json / tokenizer_config.json -> HF
                                      # *.model file, or folder with only tokenizer.model -> SP
    ids = tok.encode(text, add_bos=False)          # list[int]; never adds EOS
    text = tok.decode(ids, skip_special=True)
    prompt = tok.apply_chat_template(messages_or_prompt, add_generation_prompt=True)  # str
    tok.eos_ids  # tuple[int, ...]: tokenizer EOS + generation_config.json / config.json EOS ids
    tok.pad_id   # pad token, else the first EOS id
    tok.bos_id   # int | None
    tok.vocab_size

``encode`` adds no special tokens unless ``add_bos=True`` (chat templates already contain
theirs). ``apply_chat_template`` returns text; encode it with ``add_bos=False``. Everything is
offline: ``AutoTokenizer.from_pretrained(..., local_files_only=True)``.

SentencePiece models have no chat template; they use ``chat_template`` if given, else
``DEFAULT_CHAT_TEMPLATE`` ("User: ...\\nAssistant:"), rendered with jinja2 as transformers does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

Messages = str | Sequence[Mapping[str, str]]

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _as_messages(messages: Messages) -> list[dict[str, str]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]


def _eos_from_json(folder: str) -> list[int]:
    """EOS ids listed in generation_config.json and config.json (int or list), in that order."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            continue
        with open(file) as f:
            value = json.load(f).get("eos_token_id")
        if value is None:
            continue
        ids.extend([value] if isinstance(value, int) else list(value))
    return ids


def _unique(ids: Sequence[int | None]) -> tuple[int, ...]:
    out: list[int] = []
    for i in ids:
        if i is not None and i >= 0 and i not in out:
            out.append(int(i))
    return tuple(out)


class Tokenizer:
    """Backend-independent interface; see the module docstring."""

    backend: str = ""

    @property
    def eos_ids(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def bos_id(self) -> int | None:
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        raise NotImplementedError

    @property
    def adds_bos(self) -> bool:
        """Whether text this tokenizer encodes for its model starts with BOS (Llama: yes; Qwen
        has no BOS token)."""
        return self.bos_id is not None

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            return [self.bos_id, *ids]
        return ids


class HFTokenizer(Tokenizer):
    """Adapter over ``transformers.AutoTokenizer`` loaded from a local folder."""

    backend = "hf"

    def __init__(self, path: str | os.PathLike, chat_template: str | None = None):
        from transformers import AutoTokenizer

        path = os.fspath(path)
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._chat_template = chat_template
        self._eos = _unique([self._tok.eos_token_id, *_eos_from_json(path)])

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped transformers tokenizer."""
        return self._tok

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def bos_id(self) -> int | None:
        return self._tok.bos_token_id

    @property
    def adds_bos(self) -> bool:
        """What transformers does: `tokenizer(text)` starts with BOS (its add_bos_token)."""
        bos = self.bos_id
        return bos is not None and self._tok("x").input_ids[:1] == [bos]

    @property
    def pad_id(self) -> int:
        pad = self._tok.pad_token_id
        if pad is not None:
            return int(pad)
        if not self._eos:
            raise ValueError("tokenizer has neither a pad nor an EOS token")
        return self._eos[0]

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False))
        return self._with_bos(ids, add_bos)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        template = self._chat_template
        if template is None and not getattr(self._tok, "chat_template", None):
            template = DEFAULT_CHAT_TEMPLATE
        return self._tok.apply_chat_template(
            _as_messages(messages),
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )


class SentencePieceTokenizer(Tokenizer):
    """Adapter over a SentencePiece ``.model`` file."""

    backend = "sentencepiece"

    def __init__(
        self,
        model_file: str | os.PathLike,
        chat_template: str | None = None,
        extra_eos_ids: Sequence[int] = (),
    ):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=os.fspath(model_file))
        self._chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self._eos = _unique([self._sp.eos_id(), *extra_eos_ids])

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def bos_id(self) -> int | None:
        bos = self._sp.bos_id()
        return None if bos < 0 else int(bos)

    @property
    def pad_id(self) -> int:
        pad = self._sp.pad_id()
        if pad >= 0:
            return int(pad)
        if not self._eos:
            raise ValueError("SentencePiece model has neither a pad nor an EOS piece")
        return self._eos[0]

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return self._with_bos(list(self._sp.encode(text)), add_bos)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            return self._sp.decode([i for i in ids if not self._is_special(i)])
        # SentencePiece drops control pieces when decoding; splice their text back in.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if self._is_special(i):
                parts.append(self._sp.decode(run))
                parts.append(self._sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def _is_special(self, i: int) -> bool:
        return bool(self._sp.is_control(i) or self._sp.is_unknown(i))

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        bos = self.bos_id
        eos = self._eos[0] if self._eos else None
        return env.from_string(self._chat_template).render(
            messages=_as_messages(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token="" if bos is None else self._sp.id_to_piece(bos),
            eos_token="" if eos is None else self._sp.id_to_piece(eos),
        )


def load_tokenizer(path: str | os.PathLike, chat_template: str | None = None) -> Tokenizer:
    """Picks the backend from what ``path`` contains (see the module docstring)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".model"):
            return SentencePieceTokenizer(path, chat_template)
        raise ValueError(f"{path}: expected a SentencePiece .model file or a tokenizer folder")
    if not os.path.isdir(path):
        raise FileNotFoundError(path)
    files = set(os.listdir(path))
    if files & {"tokenizer.json", "tokenizer_config.json"}:
        return HFTokenizer(path, chat_template)
    if "tokenizer.model" in files:
        return SentencePieceTokenizer(
            os.path.join(path, "tokenizer.model"), chat_template, _eos_from_json(path)
        )
    raise FileNotFoundError(
        f"{path}: no tokenizer.json, tokenizer_config.json or tokenizer.model found"
    )
