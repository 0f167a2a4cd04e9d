"""Tokenizer adapter over both backends, on tokenizers trained offline in a temp dir."""

from __future__ import annotations

import json
import random

import pytest

from dynamo_jax.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)

WORDS = (
    "the answer is seven plus three equals ten so we box it and check the sum twice "
    "prove that every even number greater than two is a sum of primes maybe"
).split()


def _corpus(n: int = 300) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(path)
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return path


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("sp_tok")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_prefix=str(path / "tokenizer"),
        vocab_size=120,
        model_type="bpe",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    return path / "tokenizer.model"


def test_hf_backend(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer)
    im_end = tok.hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    endoftext = tok.hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_ids == (im_end, endoftext)  # tokenizer EOS first, then generation_config
    assert tok.pad_id == endoftext
    assert tok.vocab_size == len(tok.hf_tokenizer) >= 200
    assert tok.bos_id is None

    text = "the answer is  seven, prove it!"
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids) and len(ids) < len(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True) == ids  # no BOS token: nothing to add

    prompt = tok.apply_chat_template("what is 7+3?")
    assert prompt == "<|im_start|>user\nwhat is 7+3?<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tok.encode(prompt)
    assert prompt_ids.count(im_end) == 1  # special tokens in the text map to their ids
    assert tok.decode(prompt_ids, skip_special=True) == "user\nwhat is 7+3?\nassistant\n"
    assert tok.decode(prompt_ids, skip_special=False) == prompt
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).count("<|im_start|>") == 2


def test_hf_backend_without_template_uses_default(hf_dir, tmp_path):
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert tok.apply_chat_template("hi") == "User: hi\nAssistant:"


def test_sentencepiece_backend(sp_model, tmp_path):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_ids, tok.vocab_size) == (0, 2, (3,), 120)

    text = "the answer is seven plus three"
    ids = tok.encode(text)
    assert ids and 2 not in ids and 3 not in ids
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True) == [2, *ids]
    assert tok.decode([2, *ids, 3]) == text
    assert tok.decode([2, *ids, 3], skip_special=False) == "<s>" + text + "</s>"

    assert tok.apply_chat_template("what is 7+3?") == "User: what is 7+3?\nAssistant:"
    custom = load_tokenizer(sp_model, chat_template="{{ bos_token }}{{ messages[0].content }}")
    assert custom.apply_chat_template("hi") == "<s>hi"

    # A folder holding only tokenizer.model (+ generation_config EOS) picks SentencePiece too.
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 0]}))
    from_dir = load_tokenizer(tmp_path)
    assert isinstance(from_dir, SentencePieceTokenizer)
    assert from_dir.eos_ids == (3, 0)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    assert "Assistant:" in DEFAULT_CHAT_TEMPLATE


def test_math_prompts_start_with_bos_as_transformers_encodes_them(tmp_path, hf_dir):
    """A Llama-style tokenizer (its post-processor adds BOS) without a chat template: the math
    prompt starts with BOS, as transformers' tokenizer(text) does; with a template holding
    {{ bos_token }} it is not doubled; a tokenizer without BOS adds nothing."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from dynamo_jax.math_task import format_math_prompt, math_prompt_encoder

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw.train_from_iterator(
        _corpus(),
        trainers.BpeTrainer(vocab_size=300, special_tokens=special, initial_alphabet=alphabet),
    )
    bos = raw.token_to_id("<|begin_of_text|>")
    raw.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    for template in (None, "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"):
        path = tmp_path / f"llama_{template is None}"
        fast = PreTrainedTokenizerFast(
            tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
        )
        if template:
            fast.chat_template = template
        fast.save_pretrained(path)
        tok = load_tokenizer(path)
        assert tok.adds_bos
        ids = math_prompt_encoder(tok)("two plus two")
        assert ids[0] == bos and ids[1] != bos
        if template is None:
            text = format_math_prompt(tok, "two plus two")
            assert ids == AutoTokenizer.from_pretrained(path)(text)["input_ids"]
    qwen_like = load_tokenizer(hf_dir)  # no BOS token: prompts unchanged
    assert not qwen_like.adds_bos
    text = format_math_prompt(qwen_like, "two plus two")
    assert math_prompt_encoder(qwen_like)("two plus two") == qwen_like.encode(text)
