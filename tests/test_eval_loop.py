"""The benchmark evaluation loop (evaluation.evaluate_benchmarks) and the math task builder.

Everything is built offline in temp dirs: a byte-level BPE tokenizer with a ChatML template, a tiny
random Qwen2-style model, benchmark JSONL files. One test drives the real Sampler with a stub
verifier (structure, files, pass@k consistency with the per-sample counts, chunking invariance);
one drives a scripted sampler through the real MathVerifier (in-process) for exact numbers.
"""

from __future__ import annotations

import json
import types
import zlib

import jax
import numpy as np
import pytest

from dynamo_jax import buckets as bk
from dynamo_jax import config as config_lib
from dynamo_jax import evaluation, math_task
from dynamo_jax.data.templates import QWEN_MATH_SYSTEM

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROBLEMS = {
    "tiny_a": [("What is 2+2?", "4"), ("Compute 3*3.", "9"), ("Half of 1?", "\\frac{1}{2}")],
    "tiny_b": [("What is 10-3?", "7"), ("Square of 4?", "16")],
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [QWEN_MATH_SYSTEM, "system user assistant"] * 20
    corpus += [p for probs in PROBLEMS.values() for p, _ in probs] * 5
    corpus += ["the answer is \\boxed{4} so 2+2=4", "we compute 3*3=9 and 10-3=7"] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("math_tok")
    fast.save_pretrained(path)
    return path


# A 1-layer Qwen2-style model for the math-task runs (the vocabulary comes from the tokenizer).
TINY_MATH_ARCH = dict(
    model_type="qwen2",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("math_data")
    _write_jsonl(
        d / "train.jsonl",
        [{"problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(6)],
    )
    for name, probs in PROBLEMS.items():
        rows = [{"id": f"q{i}", "problem": p, "answer": a} for i, (p, a) in enumerate(probs)]
        _write_jsonl(d / f"{name}.jsonl", rows)
    return d


def _math_config(tokenizer_dir, data_dir):
    c = config_lib.get_default_config()
    c.data.task = "math"
    c.data.train_path = str(data_dir / "train.jsonl")
    c.tokenizer.path = str(tokenizer_dir)
    c.eval.benchmarks = ",".join(f"{n}={data_dir / n}.jsonl" for n in PROBLEMS)
    c.sampling.max_new_tokens = 6
    return c


def test_build_math_task(tokenizer_dir, data_dir):
    config = _math_config(tokenizer_dir, data_dir)
    task = math_task.build_math_task(config, "/unused", verifier_workers=0)
    try:
        assert len(task.train) == 6 and task.train[0] == {
            "id": "train:1",  # no id column: rows are numbered
            "prompt": "What is 0+1?",
            "answer": "1",
        }
        assert list(task.benchmarks) == ["tiny_a", "tiny_b"]
        assert [r["id"] for r in task.heldout][:2] == ["tiny_a:q0", "tiny_a:q1"]
        assert len(task.heldout) == 5 and task.max_new_tokens == 6
        # The prompt is the chat template around the Qwen2.5-Math system prompt.
        text = task.tokenizer.decode(task.encode_prompt("What is 2+2?"), skip_special=False)
        assert text == (
            f"<|im_start|>system\n{QWEN_MATH_SYSTEM}<|im_end|>\n<|im_start|>user\n"
            "What is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        )
        hf = task.tokenizer.hf_tokenizer
        eos = [hf.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
        assert task.tokenizer.eos_ids == tuple(eos)  # end of turn ends a response
        ok = task.verify(
            ["so \\boxed{4}", "\\boxed{0.5}", "no answer", "\\boxed{4}"], ["4"] * 2 + ["1", ""]
        )
        np.testing.assert_array_equal(ok, [True, False, False, False])  # "" = padding row
        # The latest details stay available for metrics (padding rows left out).
        assert task.verify.last.counts == {"ok": 2, "no_answer": 1, "parse_error": 0, "timeout": 0}
        assert task.verify.last.metrics()["verify/accuracy"] == pytest.approx(1 / 3)
    finally:
        task.close()


def test_math_warm_start_stops_on_training_problems_it_does_not_train_on(tokenizer_dir, data_dir):
    """A math warm start with an early stop is scored on eval.num_prompts training problems
    held out of its examples (it used to be scored on the benchmarks the run reports); RL still
    samples every training problem, and without an early stop nothing is held out."""
    from dynamo_jax import trainer

    config = _math_config(tokenizer_dir, data_dir)
    config.sft.steps, config.sft.target_accuracy, config.eval.num_prompts = 10, 0.5, 2
    train = math_task.load_train_records(config)
    examples, validation = math_task.warm_start_split(config, train)
    assert len(validation) == 2 and len(examples) == 4
    assert sorted(r["id"] for r in examples + validation) == sorted(r["id"] for r in train)
    assert math_task.warm_start_split(config, train) == (examples, validation)  # seeded
    config.data.seed = 1
    assert math_task.warm_start_split(config, train)[1] != validation
    config.data.seed = 0
    task = math_task.build_math_task(config, "/unused", verifier_workers=0)
    assert task.train == train and trainer._warm_start_records(task) == (examples, validation)

    config.sft.target_accuracy = 0.0
    assert math_task.warm_start_split(config, train) == (None, None)
    config.sft.target_accuracy, config.eval.num_prompts = 0.5, 6
    with pytest.raises(math_task.ConfigError, match=r"eval.num_prompts = 6 .* holds 6"):
        math_task.warm_start_split(config, train)


def test_missing_math_paths_are_named(tokenizer_dir, data_dir, tmp_path):
    config = _math_config(tokenizer_dir, data_dir)
    config.data.train_path = ""
    config.tokenizer.path = ""
    with pytest.raises(config_lib.ConfigError) as err:
        math_task.build_math_task(config, str(tmp_path), verifier_workers=0)
    msg = str(err.value)
    assert "data.train_path is required for data.task='math'" in msg
    assert "--config.data.train_path=/path/train.jsonl" in msg
    assert "model.path is required" in msg and "--config.model.path=" in msg
    config = _math_config(tokenizer_dir, data_dir)
    config.eval.benchmarks = "tiny_a"
    with pytest.raises(config_lib.ConfigError, match="not name=path"):
        math_task.build_math_task(config, str(tmp_path), verifier_workers=0)
    config.eval.benchmarks = f"x={tmp_path / 'nope.jsonl'}"
    with pytest.raises(config_lib.ConfigError, match="x=.*no such file"):
        math_task.build_math_task(config, str(tmp_path), verifier_workers=0)


def _stub_verify(responses, answers):
    """Deterministic, mixed correctness that depends only on the response text."""
    return np.array([zlib.crc32(r.encode()) % 2 == 0 for r in responses])


def test_evaluate_benchmarks_with_sampler(tokenizer_dir, data_dir, tmp_path):
    from dynamo_jax import models
    from dynamo_jax.sampling import FINISH_LENGTH, Sampler

    assert evaluation._FINISH_LENGTH == FINISH_LENGTH  # evaluation.py does not import jax

    config = _math_config(tokenizer_dir, data_dir)
    tok = math_task.load_math_tokenizer(config)
    benchmarks = math_task.load_benchmarks(config)
    arch = dict(TINY_MATH_ARCH, vocab_size=416)
    model = models.init_model(models.ModelConfig.from_hf_dict(arch), 0)
    spec = bk.BucketSpec(
        prompt_len_buckets=(128,), row_buckets=16, prompt_count_buckets=4, max_new_tokens=6
    )
    sampler = Sampler(model, eos_ids=tok.eos_ids, pad_id=tok.pad_id, spec=spec)
    k = 4
    kwargs = dict(k=k, temperature=1.0, verify=_stub_verify, key=jax.random.key(3), pass_k=[2, 4])
    markdown, data = evaluation.evaluate_benchmarks(
        sampler, model, tok, benchmarks, **kwargs, max_rows_per_call=8, out_dir=tmp_path
    )
    # Files: the same table and data as returned.
    assert (tmp_path / "eval_results.md").read_text() == markdown
    assert json.loads((tmp_path / "eval_results.json").read_text()) == json.loads(json.dumps(data))
    lines = markdown.strip().splitlines()
    assert "| benchmark | num_problems | pass@1 | pass@2 | pass@4 | maj@2 | maj@4 |" in lines
    assert lines[-3].startswith("| tiny_a | 3 |") and lines[-2].startswith("| tiny_b | 2 |")
    assert lines[-1].startswith("| **average** | 5 |")
    assert data["columns"] == ["num_problems", "pass@1", "pass@2", "pass@4", "maj@2", "maj@4"]
    assert data["settings"]["samples_per_problem"] == k and data["settings"]["pass_k"] == [1, 2, 4]

    # Every metric agrees with the per-problem correct counts.
    for name in PROBLEMS:
        counts = np.array([p["num_correct"] for p in data["details"][name]["per_problem"]])
        metrics = data["benchmarks"][name]
        assert metrics["pass@1"] == pytest.approx(np.mean(counts / k))
        for kk in (2, 4):
            expected = evaluation.mean_pass_at_k(np.full(len(counts), k), counts, kk)
            assert metrics[f"pass@{kk}"] == pytest.approx(expected)
        assert metrics["pass@4"] == pytest.approx(np.mean(counts > 0))
        assert metrics["pass@1"] <= metrics["pass@2"] <= metrics["pass@4"]
        assert data["details"][name]["num_samples"] == k * len(counts)
        assert 1 <= data["details"][name]["mean_response_tokens"] <= 6
    average = np.mean([data["benchmarks"][n]["pass@1"] for n in PROBLEMS])
    assert data["average"]["pass@1"] == pytest.approx(average)
    counts_all = [p["num_correct"] for n in PROBLEMS for p in data["details"][n]["per_problem"]]
    assert 0 < sum(counts_all) < k * len(counts_all)  # the stub gives mixed outcomes

    # Samples are keyed by (benchmark, problem, sample): packing does not change them.
    _, again = evaluation.evaluate_benchmarks(
        sampler, model, tok, benchmarks, **kwargs, max_rows_per_call=1024
    )
    for name in PROBLEMS:
        assert again["details"][name]["per_problem"] == data["details"][name]["per_problem"]
    flat = evaluation.flat_metrics(data)
    assert flat["eval_accuracy"] == data["average"]["pass@1"]
    assert flat["eval/tiny_a/pass@4"] == data["benchmarks"]["tiny_a"]["pass@4"]
    assert not any("num_problems" in key for key in flat)

    with pytest.raises(ValueError, match="pass@8 needs at least 8 samples"):
        evaluation.evaluate_benchmarks(sampler, model, tok, benchmarks, **{**kwargs, "pass_k": 8})


class _ScriptedSampler:
    """Returns fixed responses per (problem index, sample index), like Sampler.generate."""

    def __init__(self, responses):
        self.responses = responses  # [problems][samples] token id (decoded by _Vocab)

    def generate(self, params, prompts, prompt_ids, group_sizes, key, **knobs):
        rows = [(g, s) for g, n in enumerate(group_sizes) for s in range(int(n))]
        pad = 3  # a padding row, as the real sampler adds to fill a bucket
        tokens = [[self.responses[int(prompt_ids[g])][s]] for g, s in rows] + [[0]] * pad
        return types.SimpleNamespace(
            valid=np.array([True] * len(rows) + [False] * pad),
            group_id=np.array([g for g, _ in rows] + [0] * pad),
            sample_index=np.array([s for _, s in rows] + [0] * pad),
            response_tokens=np.array(tokens),
            response_lengths=np.array([1] * len(rows) + [0] * pad),
            finish_reason=np.array([0] * len(rows) + [-1] * pad),
        )


class _Vocab:
    def __init__(self, texts):
        self.texts = texts

    def decode(self, ids):
        return "".join(self.texts[i] for i in ids)


def test_scripted_benchmark_exact_numbers(tmp_path):
    texts = [
        "\\boxed{4}",
        "\\boxed{5}",
        "I give up",
        "\\boxed{0.5}",
        "\\boxed{3}",
        "so \\boxed{\\frac{1}{2}}",
        "The answer is 8",
    ]
    b1 = [  # gold 4, 1/2, 7 (token ids index `texts`)
        [0, 1, 0, 2],  # 2 correct; vote 4 (2) beats 5 -> maj right
        [3, 4, 4, 5],  # 0.5 and \frac{1}{2} correct, one value: 2 votes tie "3" (2); the
        # earlier, 0.5, wins -> maj right (they used to split and "3" won)
        [6, 6, 1, 2],  # none correct
    ]
    b2 = [[0, 0, 0, 0]]  # gold 4: all correct
    records = {
        "b1": [
            {"id": "p0", "prompt": "x", "answer": "4"},
            {"id": "p1", "prompt": "y", "answer": "\\frac{1}{2}"},
            {"id": "p2", "prompt": "z", "answer": "7"},
        ],
        "b2": [{"id": "p0", "prompt": "w", "answer": "4"}],
    }
    verify = math_task.MathVerify(num_workers=0)
    results = {}
    for name, script in (("b1", b1), ("b2", b2)):
        _, results[name] = evaluation.evaluate_benchmarks(
            _ScriptedSampler(script),
            None,
            _Vocab(texts),
            {name: records[name]},
            k=4,
            temperature=1.0,
            verify=verify.details,
            key=0,
            encode_prompt=lambda p: [1],
            pass_k=(2, 4),
            max_rows_per_call=4,  # one problem per call
        )
    m = results["b1"]["benchmarks"]["b1"]
    assert m["pass@1"] == pytest.approx((2 / 4 + 2 / 4 + 0) / 3)
    assert m["pass@2"] == pytest.approx((5 / 6 + 5 / 6 + 0) / 3)  # 1 - C(2,2)/C(4,2) = 5/6
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["maj@4"] == pytest.approx(2 / 3)
    assert m["maj@2"] == pytest.approx(2 / 3)  # ties go to the earliest answer
    per_problem = results["b1"]["details"]["b1"]["per_problem"]
    assert [p["num_correct"] for p in per_problem] == [2, 2, 0]
    assert [p["maj@4"] for p in per_problem] == [True, True, False]
    assert results["b2"]["benchmarks"]["b2"]["pass@1"] == 1.0

    # Both benchmarks in one call: the average row is the unweighted mean over benchmarks.
    class Both:
        def generate(self, params, prompts, prompt_ids, group_sizes, key, **kw):
            script = b1 if len(prompts) == 3 else b2
            return _ScriptedSampler(script).generate(params, prompts, prompt_ids, group_sizes, key)

    markdown, data = evaluation.evaluate_benchmarks(
        Both(),
        None,
        _Vocab(texts),
        records,
        4,
        1.0,
        verify,
        0,
        encode_prompt=lambda p: [1],
        out_dir=tmp_path,
        file_stem="scripted",
    )
    assert data["average"]["pass@1"] == pytest.approx(((1 / 3) + 1.0) / 2)
    assert data["average"]["num_problems"] == 4
    assert "| **average** | 4 | 66.7 | 83.3 | 83.3 |" in markdown  # pass@1, pass@4, maj@4
    assert (tmp_path / "scripted.md").exists() and (tmp_path / "scripted.json").exists()


class _ShuffledSampler(_ScriptedSampler):
    """The scripted rows (padding included) in a random order, optionally edited by `edit`."""

    def __init__(self, responses, seed, edit=None):
        super().__init__(responses)
        self.seed, self.edit = seed, edit

    def generate(self, *args, **kwargs):
        out = vars(super().generate(*args, **kwargs))
        perm = np.random.default_rng(self.seed).permutation(len(out["valid"]))
        out = {name: np.asarray(v)[perm] for name, v in out.items()}
        if self.edit is not None:
            out = self.edit(out)
        return types.SimpleNamespace(**out)


def _repeat_first_row_answering_correctly(out):
    # One extra row repeating a real (problem, sample) with a correct response (token 0 = "4").
    r = int(np.flatnonzero(out["valid"] & (out["group_id"] == 0))[0])
    extra = {name: v[r : r + 1].copy() for name, v in out.items()}
    extra["response_tokens"][:] = 0
    return {name: np.concatenate([v, extra[name]]) for name, v in out.items()}


def _wrap_last_sample_index(out):
    r = int(np.flatnonzero(out["valid"] & (out["sample_index"] == 3) & (out["group_id"] == 0))[0])
    out["sample_index"][r] = -1  # would index the last column of a numpy grid
    return out


def test_rows_in_any_order_and_bad_rows_are_caught():
    texts = ["\\boxed{4}", "\\boxed{5}", "I give up"]
    script = [[1, 1, 0, 2], [0, 0, 0, 1]]  # gold 4 for both: 1 and 3 correct
    records = [{"id": f"p{i}", "prompt": "x", "answer": "4"} for i in range(2)]
    kwargs = dict(
        k=4,
        temperature=1.0,
        verify=math_task.MathVerify(num_workers=0).details,
        key=0,
        encode_prompt=lambda p: [1],
        pass_k=(2, 4),
    )
    results = []
    for seed in range(3):  # rows and padding shuffled: every answer still meets its own gold
        _, data = evaluation.evaluate_benchmarks(
            _ShuffledSampler(script, seed), None, _Vocab(texts), {"b": records}, **kwargs
        )
        results.append(data["details"]["b"]["per_problem"])
    assert [p["num_correct"] for p in results[0]] == [1, 3]
    assert [p["maj@4"] for p in results[0]] == [False, True]
    assert results[0] == results[1] == results[2]
    for edit in (_repeat_first_row_answering_correctly, _wrap_last_sample_index):
        with pytest.raises(RuntimeError, match="unexpected or repeated row"):
            evaluation.evaluate_benchmarks(
                _ShuffledSampler(script, 0, edit), None, _Vocab(texts), {"b": records}, **kwargs
            )


def test_empty_benchmark_file_fails_at_load(tokenizer_dir, data_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    config = _math_config(tokenizer_dir, data_dir)
    config.eval.benchmarks = f"tiny_a={data_dir / 'tiny_a.jsonl'},empty={tmp_path / 'empty.jsonl'}"
    with pytest.raises(math_task.sources.DataError, match="empty=.*holds no problems"):
        math_task.load_benchmarks(config)


def test_benchmarks_name_their_own_columns_and_may_be_parquet(tokenizer_dir, data_dir, tmp_path):
    """Benchmark files name their columns differently (MATH-500 "problem", AMC23 "question"):
    an entry may name its own (`?prompt=..&answer=..`), a .parquet file is read as Parquet, and
    a missing column says how to name it for that benchmark."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_jsonl(tmp_path / "amc.jsonl", [{"question": "1+1?", "solution": "2"}])
    pq.write_table(
        pa.table({"problem": ["2+2?", "3+3?"], "answer": ["4", "6"]}), tmp_path / "m.parquet"
    )
    config = _math_config(tokenizer_dir, data_dir)
    config.eval.benchmarks = (
        f"AMC={tmp_path / 'amc.jsonl'}?prompt=question&answer=solution,M={tmp_path / 'm.parquet'}"
    )
    got = math_task.load_benchmarks(config)
    assert [(r["prompt"], r["answer"]) for r in got["AMC"]] == [("1+1?", "2")]
    assert [(r["prompt"], r["answer"]) for r in got["M"]] == [("2+2?", "4"), ("3+3?", "6")]
    config.eval.benchmarks = f"AMC={tmp_path / 'amc.jsonl'}"
    with pytest.raises(math_task.sources.DataError, match=r"AMC=.*amc.jsonl\?prompt=<column>"):
        math_task.load_benchmarks(config)
    config.eval.benchmarks = f"AMC={tmp_path / 'amc.jsonl'}?question=prompt"
    with pytest.raises(math_task.ConfigError, match="not key=column"):
        math_task.load_benchmarks(config)


def test_eval_script_base_model_and_checkpoint(tokenizer_dir, data_dir, tmp_path, monkeypatch):
    """experiments/eval.py: model.path weights without checkpoints, then the latest checkpoint
    (parameters only restored); the same weights give the same samples."""
    import shutil

    from absl import app
    from flax import nnx

    from dynamo_jax import checkpoint, models
    from dynamo_jax import sharding as shd
    from dynamo_jax import train_step as ts
    from experiments import eval as eval_script

    model_dir = tmp_path / "model"
    arch = dict(TINY_MATH_ARCH, vocab_size=416, tie_word_embeddings=False)
    models.save_pretrained(models.init_model(models.ModelConfig.from_hf_dict(arch), 1), model_dir)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    config = _math_config(tokenizer_dir, data_dir)
    config.tokenizer.path = ""
    config.model.path = str(model_dir)
    config.eval.samples_per_prompt = 3
    config.eval.pass_k = 8  # capped at the 3 samples
    config.buckets.prompt_len = (128,)
    workdir = tmp_path / "run"
    logs: list[str] = []
    kwargs = dict(verifier_workers=0, log=logs.append)
    _, base = eval_script.run(config, str(workdir), **kwargs)
    assert base["settings"]["checkpoint_step"] == 0
    assert base["columns"] == ["num_problems", "pass@1", "pass@3", "maj@3"]
    assert (workdir / "eval_results.md").exists() and (workdir / "eval_results.json").exists()
    # The cap is told, with the flag that gives the asked-for k.
    assert any(
        "eval.pass_k = 8 > 3 samples" in line
        and "reporting pass@3" in line
        and "--config.eval.samples_per_prompt=8" in line
        for line in logs
    )

    # A checkpoint holding the same weights (as the trainer saves it: full TrainState).
    model = models.load_pretrained(model_dir)
    _, _, state = ts.init_train_state(model, ts.make_optimizer(config))
    saver = checkpoint.RunCheckpointer(workdir / "checkpoints")
    saver.save(5, state, {"step": 5})
    saver.close()
    _, restored = eval_script.run(config, str(workdir), **kwargs)
    assert restored["settings"]["checkpoint_step"] == 5
    for name in PROBLEMS:  # same weights, same keys: the same samples
        for key in ("per_problem", "mean_response_tokens", "truncation_rate"):
            assert restored["details"][name][key] == base["details"][name][key]
    with pytest.raises(app.UsageError, match=r"saved steps: \[5\]"):
        eval_script.run(config, str(workdir), checkpoint_step=7, **kwargs)

    # Only the parameters are read, exactly, onto the mesh's shardings.
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    doubled = state.replace(params=jax.tree.map(lambda x: 2 * x, state.params))
    saver = checkpoint.RunCheckpointer(workdir / "checkpoints")
    saver.save(6, doubled, {"step": 6})
    saver.close()
    abstract = nnx.eval_shape(lambda: models.Transformer(model.config, rngs=nnx.Rngs(0)))
    _, abstract_params, _ = ts.split_model(abstract)
    params = eval_script.restore_params(str(workdir / "checkpoints"), 6, abstract_params, mesh)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(doubled.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert eval_script.checkpoint_steps(str(workdir)) == [5, 6]
    embed = params["embed"].get_value()
    assert embed.sharding.spec == shd.logical_to_spec(("vocab", "embed"), None, embed.shape, mesh)

    # run() samples with the checkpoint's weights, not model.path's (a tiny random model's
    # samples are all truncated either way, so the weights handed to the sampler are compared).
    seen = []
    original = evaluation.evaluate_benchmarks

    def spy(sampler, params, *args, **kw):
        seen.append(params)
        return original(sampler, params, *args, **kw)

    monkeypatch.setattr(evaluation, "evaluate_benchmarks", spy)  # eval.py imports it in run()
    _, latest = eval_script.run(config, str(workdir), **kwargs)
    assert latest["settings"]["checkpoint_step"] == 6
    got = jax.tree.leaves(seen[-1])
    want = jax.tree.leaves(doubled.params)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_script_rejects_bad_options(tokenizer_dir, data_dir, tmp_path):
    """Out-of-range options are refused by name before anything is loaded (a negative
    --max_problems used to drop the last problems as a Python slice)."""
    from experiments import eval as eval_script

    config = _math_config(tokenizer_dir, data_dir)
    cases = [
        (dict(max_problems=-1), r"--max_problems=-1: must be >= 0 \(N = the first N"),
        (dict(max_rows_per_call=0), r"--max_rows_per_call=0: must be >= 1"),
        (dict(checkpoint_step=-2), r"--checkpoint_step=-2: must be -1 \(the latest"),
        (dict(output_name=""), r"--output_name='': must be a file name stem"),
    ]
    for kwargs, message in cases:
        with pytest.raises(config_lib.ConfigError, match=message):
            eval_script.run(config, str(tmp_path), verifier_workers=0, **kwargs)
    config.eval.pass_k = 0
    with pytest.raises(config_lib.ConfigError, match=r"eval.pass_k = 0 must be >= 1"):
        eval_script.run(config, str(tmp_path), verifier_workers=0)
    assert not list(tmp_path.iterdir())  # nothing written


# The last case lets Orbax fail a read: its I/O threads then report a closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_eval_script_refuses_a_checkpoint_of_another_model(
    tokenizer_dir, data_dir, tmp_path, monkeypatch
):
    """A checkpoint trained with another model shape: one ConfigError naming the parameters and
    the config fields that differ from the run's (its host state), not Orbax's traceback."""
    from dynamo_jax import checkpoint, models
    from dynamo_jax import train_step as ts
    from experiments import eval as eval_script

    config = _math_config(tokenizer_dir, data_dir)
    config.buckets.prompt_len = (128,)
    config.model.architecture = dict(TINY_MATH_ARCH)
    vocab = int(math_task.load_math_tokenizer(config).vocab_size)
    arch = {**config.model.architecture.to_dict(), "vocab_size": vocab}
    model = models.init_model(models.ModelConfig.from_hf_dict(arch), 0)
    _, _, state = ts.init_train_state(model, ts.make_optimizer(config))
    saver = checkpoint.RunCheckpointer(tmp_path / "checkpoints")
    saver.save(3, state, {"step": 3, "config": config.to_json()})
    saver.close()
    kwargs = dict(verifier_workers=0, log=lambda msg: None)

    config.model.architecture.hidden_size = 48
    with pytest.raises(config_lib.ConfigError) as err:
        eval_script.run(config, str(tmp_path), **kwargs)
    msg = str(err.value)
    where = tmp_path / "checkpoints"
    assert f"The checkpoint of step 3 in {where} does not match the config" in msg
    assert f"embed: checkpoint ({vocab}, 32), config ({vocab}, 48)" in msg
    assert "model.architecture.hidden_size: 32 -> 48" in msg
    assert "eval." not in msg  # only the fields that decide the shapes are listed
    assert "the same --config file" in msg and len(msg.splitlines()) < 15

    # Another structure: the parameter the checkpoint lacks is named first.
    config.model.architecture.hidden_size = 32
    config.model.architecture.tie_word_embeddings = False
    with pytest.raises(config_lib.ConfigError) as err:
        eval_script.run(config, str(tmp_path), **kwargs)
    lines = str(err.value).splitlines()
    assert lines[1] == f"  lm_head: in the config's model (32, {vocab}), not in the checkpoint"
    assert "  model.architecture.tie_word_embeddings: True -> False" in lines

    # Orbax's own shape error (were the check before reading to miss one) gives the same error.
    config.model.architecture.tie_word_embeddings = True
    config.model.architecture.hidden_size = 48
    monkeypatch.setattr(eval_script, "param_differences", lambda saved, wanted: [])
    with pytest.raises(config_lib.ConfigError) as err:
        eval_script.run(config, str(tmp_path), **kwargs)
    assert "is not compatible with the stored shape" in str(err.value)
    assert "model.architecture.hidden_size: 32 -> 48" in str(err.value)


def test_math_run_logs_benchmark_metrics(tokenizer_dir, data_dir, tmp_path):
    """trainer.train on data.task='math' (random tiny model, tokenizer.path): benchmark pass@k /
    maj@k are logged every eval.every steps and written to WORKDIR/eval/."""
    import inspect

    from dynamo_jax import metrics, trainer

    if "build_math_task" not in inspect.getsource(trainer.build_task):
        pytest.skip("data.task='math' is not wired into trainer.build_task yet")
    c = _math_config(tokenizer_dir, data_dir)
    c.eval.every, c.eval.samples_per_prompt, c.eval.pass_k = 1, 2, 2
    c.prompts_per_step, c.rollouts_per_prompt = 4, 4
    c.allocation.n_low, c.allocation.n_high = 2, 8
    c.train.num_minibatches, c.train.micro_batch_rows, c.train.num_steps = 2, 8, 1
    c.buckets.prompt_len, c.loss.logits_chunk_size, c.sft.steps = (128,), 8, 0
    c.model.architecture = dict(TINY_MATH_ARCH)
    summary = trainer.train(c, str(tmp_path), progress=False, log=lambda msg: None)
    logged = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logged] == [0]
    for record in logged:
        for name in (*PROBLEMS, "average"):
            assert {f"eval/{name}/{m}" for m in ("pass@1", "pass@2", "maj@2")} <= set(record)
        assert record["eval_accuracy"] == record["eval/average/pass@1"]
        # the RL step logs its verifier's details: statuses (parse errors, time-outs) and restarts
        assert record["verify/accuracy"] == pytest.approx(record["accuracy"])
        assert {"verify/frac_timeout", "verify/worker_restarts"} <= set(record)
    assert summary["heldout_accuracy_after"] == summary["heldout_after"]["eval/average/pass@1"]
    written = sorted(p.name for p in (tmp_path / "eval").iterdir())
    assert written == [f"eval_step_{s}.{e}" for s in (0, 1) for e in ("json", "md")]
