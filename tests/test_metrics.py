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


def test_resume_survives_a_torn_last_line_and_a_kill_during_the_rewrite(tmp_path, monkeypatch):
    """A kill or a full disk can leave the log's last line half written: that line is a step
    after the checkpoint, dropped anyway, and must not stop the resume. The resume's rewrite goes
    to a file beside the log and is renamed over it, so a kill during it keeps the old log."""
    import json

    import pytest

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(5)) + '{"step": 5, "re')
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2, 3, 4]
    MetricsWriter(tmp_path, total_steps=9, start_step=4, tensorboard=False, progress=False)
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2, 3]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during the rewrite")

    monkeypatch.setattr(json, "dumps", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsWriter(tmp_path, total_steps=9, start_step=2, tensorboard=False, progress=False)
    monkeypatch.undo()
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2, 3]
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')  # corruption, not a torn write
    with pytest.raises(ValueError, match="metrics.jsonl:line 2"):
        read_jsonl(path)


def _scalar_steps(logdir, tag):
    """Steps of `tag` in every event file under `logdir` (TFRecord framing read by hand)."""
    import struct

    from tensorboardX.proto import event_pb2

    steps = []
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            while header := f.read(8):
                data = f.read(4) and f.read(struct.unpack("<Q", header)[0])
                f.read(4)
                event = event_pb2.Event.FromString(data)
                steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_sync_puts_every_logged_event_on_disk(tmp_path):
    """Before a checkpoint the trainer syncs the writer: tensorboardX's flush() does not wait
    for its writer thread's queue, so a run killed after the checkpoint lost those steps."""
    w = MetricsWriter(tmp_path, total_steps=30, progress=False)
    for step in range(30):
        w.write(step, {"reward": float(step)})
    w.sync()  # no close(): a SIGKILL could come now
    assert _scalar_steps(tmp_path / "tensorboard", "reward") == list(range(30))
    w.write(30, {"reward": 1.0})
    w.close()
    assert _scalar_steps(tmp_path / "tensorboard", "reward") == list(range(31))


def test_progress_bar_counts_steps_not_writes(tmp_path):
    w = MetricsWriter(tmp_path, total_steps=8, start_step=0, progress=True)
    for step in (2, 5, 7):  # log_every = 3: the last step is always written
        w.write(step, {"reward": 0.0})
    assert w._bar.n == 8
    w.close()
