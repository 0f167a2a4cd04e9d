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
