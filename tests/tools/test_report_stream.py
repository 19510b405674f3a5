"""``spu report`` reads events.jsonl as a stream: what it holds is bounded by what the report keeps, not the file."""

from __future__ import annotations

import json
import tracemalloc

from spu_engine.core.runs import EVENTS, iter_history, read_history
from spu_engine.tools.report import load_run_report


def _write(run_dir, events, damaged_line=False):
    run_dir.mkdir()
    with (run_dir / EVENTS).open("w") as f:
        for i, ev in enumerate(events):
            f.write(json.dumps(ev) + "\n")
            if damaged_line and i == 2:
                f.write('{"type": "step", "st\n')


def _held(events):
    """The old reading, all events held: what each ``resumed`` cut drops from what came before it."""
    history = []
    for ev in events:
        if ev.get("type") == "resumed":
            history = [e for e in history if not (isinstance(e.get("step"), int) and e["step"] > ev.get("step", 0))]
        history.append(ev)
    return history


def test_the_stream_drops_what_each_resume_cut_as_the_held_history_did(tmp_path):
    steps = lambda a, b: [{"type": "step", "step": s, "loss": 1.0 / s} for s in range(a, b)]  # noqa: E731
    events = [
        {"type": "hello", "step": 0},
        *steps(1, 9),
        {"type": "resumed", "step": 5},  # a kill after step 8, resumed from 5
        *steps(6, 12),
        {"type": "eval", "step": 11, "eval_loss": 0.5},
        {"type": "resumed", "step": 3},  # resumed from an older checkpoint: cuts the first resume's event too
        *steps(4, 7),
        {"type": "log", "text": "no step"},
        {"type": "resumed", "step": 6},
        *steps(7, 9),
    ]
    _write(tmp_path / "run", events, damaged_line=True)
    damaged: list[int] = []
    assert list(iter_history(tmp_path / "run", damaged)) == _held(events) == read_history(tmp_path / "run")
    assert damaged == [4]


def test_report_holds_its_series_not_the_file(tmp_path):
    """20 000 long log lines (~12 MB of events the report does not keep): the old reading held them all."""
    line = {"type": "log", "level": "info", "text": "x" * 500}
    events = [{"type": "hello", "step": 0, "config": {"steps": 40}}]
    for s in range(1, 41):
        events += [{"type": "step", "step": s, "loss": 1.0 / s, "t": s}] + [{**line, "step": s}] * 500
    _write(tmp_path / "run", events)
    assert (tmp_path / "run" / EVENTS).stat().st_size > 10_000_000
    tracemalloc.start()
    try:
        report = load_run_report(tmp_path / "run")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.metrics.step == 40 and report.metrics.last("train.loss") == 1 / 40
    assert peak < 2_000_000, f"report peaked at {peak / 1e6:.1f} MB over a 12 MB events file"
