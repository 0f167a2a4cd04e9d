import os

import numpy as np

from dynamo_jax.metrics import MetricsWriter, read_jsonl


def test_jsonl_tensorboard_and_resume_truncation(tmp_path):
    w = MetricsWriter(tmp_path, total_steps=5, progress=False)
    for step in range(4):
        w.write(
            step,
            {"reward": 0.1 * step, "nan_metric": float("nan")},
            histograms={"allocation": np.array([4, 8, 12])},
        )
    w.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[2]["reward"] == 0.2 and rows[0]["nan_metric"] is None
    assert rows[1]["allocation"] == [4, 8, 12]  # histogram inputs kept exactly in the JSONL
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    # a run resumed from a checkpoint at step 2 drops the lines the killed run wrote after it
    w = MetricsWriter(tmp_path, total_steps=5, start_step=2, progress=False)
    w.write(2, {"reward": 9.0})
    w.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[-1]["reward"] == 9.0
