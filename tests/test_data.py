"""Tests for dynamo_jax.data: sources, templates, the checkpointable iterator."""

import json

import numpy as np
import pytest

from dynamo_jax.data import (
    CHATML_TEMPLATE,
    DEFAULT_FIELDS,
    PLAIN_TEMPLATE,
    QWEN_MATH_SYSTEM,
    DataError,
    JsonlSource,
    ParquetSource,
    PromptIterator,
    TfdsSource,
    build_messages,
    format_prompt,
    format_prompts,
    load_records,
)
from dynamo_jax.data.sources import to_record

ROWS = [
    {"id": "a", "problem": "What is 1+1?", "answer": "2"},
    {"id": "b", "problem": "Solve x^2=4, x>0.", "answer": "2"},
    {"id": "c", "problem": "Compute \\frac{1}{2}+\\frac{1}{2}. Ünïcödé", "answer": "1"},
]
EXPECTED = [{"id": r["id"], "prompt": r["problem"], "answer": r["answer"]} for r in ROWS]


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# JSONL
# ------------------------------------------------------------------------------------------------


def test_jsonl_roundtrip(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS, raw_lines=["", "   "])
    assert JsonlSource(path).load() == EXPECTED
    assert list(JsonlSource(str(path))) == EXPECTED


def test_jsonl_field_mapping_nested_and_numbers(tmp_path):
    rows = [
        {"uid": 7, "question": "q1", "reward_model": {"ground_truth": 72}},
        {"uid": 8, "question": "q2", "reward_model": {"ground_truth": 0.5}},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    fields = {"id": "uid", "prompt": "question", "answer": "reward_model.ground_truth"}
    assert JsonlSource(path, fields=fields).load() == [
        {"id": "7", "prompt": "q1", "answer": "72"},
        {"id": "8", "prompt": "q2", "answer": "0.5"},
    ]


def test_jsonl_derived_ids_only_with_flag(tmp_path):
    rows = [{"problem": "p1", "answer": "1"}, {"problem": "p2", "answer": "2"}]
    path = write_jsonl(tmp_path / "gsm.jsonl", rows)
    with pytest.raises(DataError, match=r"gsm\.jsonl:line 1: missing field 'id'.*derive_ids"):
        JsonlSource(path).load()
    assert [r["id"] for r in JsonlSource(path, derive_ids=True)] == ["gsm:1", "gsm:2"]
    # Numbered by physical line, as errors name them: after a blank line 2, the row on line 3
    # is gsm:3 (it used to be gsm:2, pointing at the wrong line).
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert [r["id"] for r in JsonlSource(path, derive_ids=True)] == ["gsm:1", "gsm:3"]
    other = tmp_path / "other"
    other.mkdir()
    twin = write_jsonl(other / "gsm.jsonl", rows)
    with pytest.raises(DataError, match="give such files distinct names or an id column"):
        load_records([JsonlSource(path, derive_ids=True), JsonlSource(twin, derive_ids=True)])


@pytest.mark.parametrize(
    "bad_line,message",
    [
        ('{"id": "x", "problem": "p"', r"line 3: bad JSON"),
        (
            '{"id": "x", "problem": "p"}',
            r"line 3: missing field 'answer' \(column 'answer'\).*data.answer_field",
        ),
        ('{"id": "x", "problem": 5, "answer": "1"}', r"line 3: field 'prompt' .* must be a string"),
        ('{"id": "x", "problem": ["p"], "answer": "1"}', r"line 3: field 'prompt'.*got list"),
        ('{"id": "x", "problem": "  ", "answer": "1"}', r"line 3: field 'prompt'.*is empty"),
        ('{"id": "x", "problem": "p", "answer": ""}', r"line 3: field 'answer'.*is empty"),
        ('{"id": "x", "problem": "p", "answer": null}', r"line 3: missing field 'answer'"),
        ('{"id": true, "problem": "p", "answer": "1"}', r"line 3: field 'id'.*got bool"),
        ("[1, 2, 3]", r"line 3: expected an object"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ROWS[:2], raw_lines=[bad_line])
    with pytest.raises(DataError, match=message) as info:
        JsonlSource(path).load()
    assert str(path) in str(info.value)


def test_jsonl_bad_encoding_names_the_line_and_bom_is_accepted(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(ROWS[0]).encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + '{"id": "b", "problem": "caf\u00e9", '
                     '"answer": "1"}\n'.encode("latin-1"))  # fmt: skip
    with pytest.raises(DataError, match=r"latin1\.jsonl:line 2: not UTF-8"):
        JsonlSource(path).load()
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n")  # a BOM and CRLF line ends
    assert JsonlSource(path).load() == EXPECTED[:1]


def test_numpy_numbers_become_their_shortest_text():
    # TFDS rows hold numpy scalars: np.float64's repr is "np.float64(0.5)", and float32 widened
    # to float64 prints "0.10000000149011612"; both would never match a model's answer.
    row = {"id": np.float64(3.0), "problem": np.str_("p"), "answer": np.float64(0.5)}
    assert to_record(row, DEFAULT_FIELDS, where="w", derived_id=None) == {
        "id": "3",
        "prompt": "p",
        "answer": "0.5",
    }
    row = {"id": np.int64(4), "problem": "p", "answer": np.float32(0.1)}
    assert to_record(row, DEFAULT_FIELDS, where="w", derived_id=None)["answer"] == "0.1"
    for bad in (np.float32("nan"), np.float64("inf"), np.bool_(True)):
        with pytest.raises(DataError, match="w: field 'answer'"):
            to_record({"id": "a", "problem": "p", "answer": bad}, DEFAULT_FIELDS, where="w",
                      derived_id=None)  # fmt: skip


def test_jsonl_duplicate_ids_name_both_rows(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", ROWS + [{"id": "b", "problem": "z", "answer": "0"}])
    with pytest.raises(DataError, match=r"duplicate prompt id 'b': .*line 2 and .*line 4"):
        JsonlSource(path).load()


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        JsonlSource(tmp_path / "nope.jsonl").load()
    with pytest.raises(ValueError, match="unknown"):
        JsonlSource(tmp_path / "x.jsonl", fields={"question": "q"})


def test_load_records_across_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[2:])
    assert load_records([JsonlSource(a), JsonlSource(b)]) == EXPECTED
    with pytest.raises(DataError, match="duplicate prompt id 'a' across sources #1 and #2"):
        load_records([JsonlSource(a), JsonlSource(a)])


# ------------------------------------------------------------------------------------------------
# Parquet
# ------------------------------------------------------------------------------------------------


def test_parquet_roundtrip_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert ParquetSource(path, batch_size=2).load() == EXPECTED

    pq.write_table(
        pa.Table.from_pylist([{"problem": r["problem"], "answer": 1} for r in ROWS]), path
    )
    with pytest.raises(
        DataError, match=r"math\.parquet: missing field 'id': no column 'id'.*data.id_field"
    ):
        ParquetSource(path).load()
    assert [r["id"] for r in ParquetSource(path, derive_ids=True)] == ["math:1", "math:2", "math:3"]
    assert ParquetSource(path, derive_ids=True).load()[0]["answer"] == "1"

    # float32 / float16 answers keep their own precision's text, not the widened double's
    values = [0.1, 2.3, 1e20]
    for dtype, expected in ((pa.float32(), ["0.1", "2.3", "1e+20"]), (pa.float16(), ["0.1"])):
        table = pa.table(
            {
                "id": ["a", "b", "c"][: len(expected)],
                "problem": ["p"] * len(expected),
                "answer": pa.array(values[: len(expected)], type=dtype),
            }
        )
        pq.write_table(table, path)
        assert [r["answer"] for r in ParquetSource(path).load()] == expected
        # ... also inside a struct column (verl's reward_model.ground_truth)
        nested = pa.table(
            {
                "problem": ["p"] * len(expected),
                "reward_model": pa.array(
                    [{"ground_truth": v, "style": "rule"} for v in values[: len(expected)]],
                    type=pa.struct([("ground_truth", dtype), ("style", pa.string())]),
                ),
            }
        )
        pq.write_table(nested, tmp_path / "nested.parquet")
        fields = {"id": "id", "prompt": "problem", "answer": "reward_model.ground_truth"}
        got = ParquetSource(tmp_path / "nested.parquet", fields, derive_ids=True).load()
        assert [r["answer"] for r in got] == expected

    rows = [dict(r) for r in ROWS]
    rows[2]["answer"] = None
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"math\.parquet:row 3: missing field 'answer'"):
        ParquetSource(path, batch_size=2).load()

    nested = [{"id": "n", "extra": {"q": "p"}, "answer": "1"}]
    pq.write_table(pa.Table.from_pylist(nested), path)
    assert ParquetSource(path, fields={"prompt": "extra.q"}).load() == [
        {"id": "n", "prompt": "p", "answer": "1"}
    ]

    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        ParquetSource(tmp_path / "junk.parquet").load()


# ------------------------------------------------------------------------------------------------
# TFDS (our own builder, prepared locally as array_record; read back without TensorFlow)
# ------------------------------------------------------------------------------------------------


def _prepare_tiny_tfds(data_dir, splits):
    import tensorflow_datasets as tfds

    with tfds.core.registered.skip_registration():  # readers must not need this class

        class TinyMathTest(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                text = tfds.features.Text()
                features = tfds.features.FeaturesDict({"id": text, "problem": text, "answer": text})
                return tfds.core.DatasetInfo(builder=self, features=features)

            def _split_generators(self, dl_manager):
                return {name: self._generate_examples(path) for name, path in splits.items()}

            def _generate_examples(self, path):
                with open(path, encoding="utf-8") as f:
                    for i, line in enumerate(f):
                        yield i, json.loads(line)

    builder = TinyMathTest(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder.name


def test_tfds_source_reads_locally_prepared_array_record(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[:1])
    data_dir = tmp_path / "tfds"
    name = _prepare_tiny_tfds(data_dir, {"train": train, "test": test})

    got = TfdsSource(name, data_dir, "train").load()
    assert sorted(got, key=lambda r: r["id"]) == EXPECTED  # TFDS orders rows by hashed key
    assert TfdsSource(f"{name}:1.0.0", data_dir, "test").load() == EXPECTED[:1]
    ids = [r["id"] for r in TfdsSource(name, data_dir, "train", derive_ids=True)]
    assert len(set(ids)) == 3

    with pytest.raises(DataError, match="split 'validation'"):
        TfdsSource(name, data_dir, "validation").load()
    with pytest.raises(DataError, match=r"not found under .*prepare it locally"):
        TfdsSource("no_such_dataset_here", data_dir, "train").load()
    with pytest.raises(DataError, match=r"tfds .*:row \d: missing field 'prompt'"):
        TfdsSource(name, data_dir, "train", fields={"prompt": "question"}).load()


# ------------------------------------------------------------------------------------------------
# Templates
# ------------------------------------------------------------------------------------------------

CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _hf_tokenizer(chat_template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    hf.chat_template = chat_template
    return hf


def test_template_through_hf_chat_template():
    problem = "What is $1+1$?"
    text = format_prompt(_hf_tokenizer(CHATML_JINJA), problem)
    assert text == CHATML_TEMPLATE.format(system=QWEN_MATH_SYSTEM, problem=problem)
    assert "\\boxed{}" in text and text.endswith("<|im_start|>assistant\n")


def test_template_fallback_without_chat_template():
    problem = "What is $1+1$?"
    expected = PLAIN_TEMPLATE.format(system=QWEN_MATH_SYSTEM, problem=problem)
    assert format_prompt(_hf_tokenizer(None), problem) == expected
    assert format_prompt(None, problem) == expected
    assert format_prompt(object(), problem) == expected  # e.g. a bare SentencePiece model
    chatml = format_prompt(None, problem, fallback=CHATML_TEMPLATE)
    assert chatml.startswith("<|im_start|>system\nPlease reason step by step")


def test_template_calls_protocol_objects():
    class Fake:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    assert format_prompt(Fake(), "p") == f"system:{QWEN_MATH_SYSTEM}|user:p"
    assert format_prompt(Fake(), "p", system=None) == "user:p"
    assert build_messages("p")[0] == {"role": "system", "content": QWEN_MATH_SYSTEM}
    assert format_prompts(Fake(), EXPECTED[:2]) == [
        f"system:{QWEN_MATH_SYSTEM}|user:{r['prompt']}" for r in EXPECTED[:2]
    ]


# ------------------------------------------------------------------------------------------------
# Iterator
# ------------------------------------------------------------------------------------------------

RECORDS = [{"id": str(i), "prompt": f"p{i}", "answer": str(i)} for i in range(10)]


def _ids(batch):
    return [r["id"] for r in batch]


@pytest.mark.parametrize("drop_remainder", [True, False])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 7])
def test_iterator_resume_matches_uninterrupted(k, drop_remainder):
    reference = PromptIterator(RECORDS, batch_size=3, seed=11, drop_remainder=drop_remainder)
    expected = [_ids(next(reference)) for _ in range(k + 6)]

    it = PromptIterator(RECORDS, batch_size=3, seed=11, drop_remainder=drop_remainder)
    seen = [_ids(next(it)) for _ in range(k)]
    state = json.loads(json.dumps(it.state()))  # survives a JSON checkpoint
    resumed = PromptIterator(RECORDS, batch_size=3, seed=11, drop_remainder=drop_remainder)
    resumed.restore(state)
    assert resumed.epoch == it.epoch
    assert seen + [_ids(next(resumed)) for _ in range(6)] == expected


def test_iterator_epochs_cover_everything_and_reshuffle():
    it = PromptIterator(RECORDS, batch_size=5, seed=0)
    assert it.steps_per_epoch == 2
    epochs = []
    for _ in range(3):
        epoch_ids = _ids(next(it)) + _ids(next(it))
        epochs.append(epoch_ids)
        assert sorted(epoch_ids, key=int) == [r["id"] for r in RECORDS]
    assert it.epoch == 2
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled per epoch
    again = PromptIterator(RECORDS, batch_size=5, seed=0)
    assert _ids(next(again)) + _ids(next(again)) == epochs[0]  # deterministic
    other = PromptIterator(RECORDS, batch_size=5, seed=1)
    assert _ids(next(other)) + _ids(next(other)) != epochs[0]


def test_iterator_remainder_and_no_shuffle():
    it = PromptIterator(RECORDS, batch_size=4, seed=0, shuffle=False, drop_remainder=True)
    assert [_ids(next(it)) for _ in range(3)] == [
        ["0", "1", "2", "3"],
        ["4", "5", "6", "7"],
        ["0", "1", "2", "3"],  # 8, 9 dropped; new epoch
    ]
    assert it.epoch == 1
    it = PromptIterator(RECORDS, batch_size=4, seed=0, shuffle=False, drop_remainder=False)
    sizes = [len(next(it)) for _ in range(4)]
    assert sizes == [4, 4, 2, 4] and it.epoch == 1
    assert it.steps_per_epoch == 3


def test_iterator_epoch_property_and_indices():
    it = PromptIterator(RECORDS, batch_size=5, seed=3)
    assert it.epoch == 0
    idx = it.next_indices()
    assert idx.shape == (5,) and it.epoch == 0
    it.next_indices()
    assert it.epoch == 0 and it.state()["position"] == 10
    it.next_indices()
    assert it.epoch == 1
    np.testing.assert_array_equal(np.sort(it.order(4)), np.arange(10))


def test_iterator_order_is_the_same_in_every_process():
    # Nothing may depend on Python's per-process hash seed (a resumed run is a new process).
    import os
    import subprocess
    import sys

    code = (
        "from dynamo_jax.data.iterator import PromptIterator as P; "
        "it = P(list(range(10)), batch_size=3, seed=11); "
        "print([int(i) for _ in range(5) for i in it.next_indices()])"
    )
    here = PromptIterator(list(range(10)), batch_size=3, seed=11)
    expected = str([int(i) for _ in range(5) for i in here.next_indices()])
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == expected, out.stderr


def test_iterator_validation():
    with pytest.raises(ValueError):
        PromptIterator([], batch_size=1, seed=0)
    with pytest.raises(ValueError):
        PromptIterator(RECORDS, batch_size=0, seed=0)
    with pytest.raises(ValueError, match="never yield"):
        PromptIterator(RECORDS, batch_size=11, seed=0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        PromptIterator(RECORDS, batch_size=2, seed=-1)
    it = PromptIterator(RECORDS, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="seed"):
        it.restore({"epoch": 0, "position": 0, "seed": 5})
    with pytest.raises(ValueError, match="num_records"):
        it.restore({"epoch": 0, "position": 0, "num_records": 3})
    with pytest.raises(ValueError, match="bad iterator state"):
        it.restore({"epoch": 0, "position": 99})


def test_iterator_refuses_a_state_over_other_records_of_the_same_count():
    """A resume over records that were regenerated differently (same count, other contents)
    would continue another run's data order over other prompts without a word."""
    it = PromptIterator(RECORDS, batch_size=2, seed=0)
    next(it)
    state = it.state()
    same = PromptIterator(list(RECORDS), batch_size=2, seed=0)
    same.restore(state)
    assert same.state() == state
    other = PromptIterator(list(reversed(RECORDS)), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="other records"):
        other.restore(state)
    old = {k: v for k, v in state.items() if k != "digest"}  # a checkpoint from before digests
    other.restore(old)
