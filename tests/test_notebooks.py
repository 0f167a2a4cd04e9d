"""The notebooks execute end to end (nbclient + ipykernel) at tiny settings.

Each notebook reads a JSON dict of parameter overrides from DYNAMO_NOTEBOOK_PARAMS (its
parameters cell); the kernel runs on one CPU device, as a user's would.
"""

import json
import os
from pathlib import Path

import pytest
from tiny_runs import TINY_ARITH

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]

TINY_RUN = {
    **TINY_ARITH,
    "model.architecture.num_hidden_layers": 1,
    "data.num_train": 16,  # two steps per epoch: the allocation leaves uniform at step 3
    "data.num_heldout": 8,
    "eval.num_prompts": 8,
    "eval.samples_per_prompt": 2,
    "eval.every": 2,
    "sft.steps": 5,
    "sft.num_examples": 64,
    "sft.eval_every": 1000,
    "train.num_minibatches": 1,
    "train.micro_batch_rows": 32,
    "allocation.min_history": 2,
    "checkpoint_every": 100,
}


def execute(name, params, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMO_NOTEBOOK_PARAMS", json.dumps(params))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # One device in the kernel (conftest gives this process 8 simulated ones).
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if "xla_force_host_platform_device_count" not in f]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    # Programs the two variants share (sampler, evaluation) compile once.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[1].cell_type == "code" and "google.colab" in nb.cells[1].source
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert not errors, errors
    return nb


def _text(nb):
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") + json.dumps(o.get("data", {})))
    return "\n".join(out)


def test_allocation_notebook(tmp_path, monkeypatch):
    nb = execute(
        "allocation.ipynb",
        {"DRAWS": 300, "HISTORIES": [4, 64]},
        tmp_path,
        monkeypatch,
    )
    text = _text(nb)
    assert "| uniform |" in text and "oracle" in text
    assert text.count("image/png") >= 2


def test_ablations_notebook(tmp_path, monkeypatch):
    # One variant keeps the test well under a minute (each run compiles its own train step);
    # the multi-variant tables and plots are tested on synthetic runs in test_analysis.py.
    params = {
        "VARIANTS": ["dynamo"],
        "SEEDS": [0],
        "STEPS": 4,
        "WORKDIR": str(tmp_path / "runs"),
        "OVERRIDES": TINY_RUN,
        "SMOOTH": 1,
    }
    nb = execute("ablations.ipynb", params, tmp_path, monkeypatch)
    text = _text(nb)
    assert "DynaMO" in text
    assert text.count("image/png") >= 3
    for v in params["VARIANTS"]:
        summary = json.load(open(tmp_path / "runs" / v / "seed0" / "summary.json"))
        assert summary["steps"] == 4 and summary["heldout_accuracy_after"] is not None
