"""Run discovery (``spu runs``, ``spu-tui attach``): state from the lock and the event log, history across a resume."""

from __future__ import annotations

import json
import os
import time

from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.protocol import encode, event
from spu_engine.core.runs import RunLock, is_live, list_runs, newest_live_run, read_history, run_info


def _run(root, name, events, steps=100, task="classification", age=0.0):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"steps": steps, "task": task}))
    (folder / "events.jsonl").write_bytes(b"".join(encode(event(kind, **fields)) for kind, fields in events))
    stamp = time.time() - age
    os.utime(folder / "events.jsonl", (stamp, stamp))
    return folder


def _trained(n, start=1, loss=1.0):
    return [("step", {"step": s, "loss": loss - s / 100}) for s in range(start, start + n)]


def test_state_comes_from_the_lock_then_the_last_state_event(tmp_path):
    started = [("state", {"state": "loading", "step": 0}), ("state", {"state": "training", "step": 0})]
    _run(
        tmp_path,
        "finished",
        [
            *started,
            *_trained(100),
            ("eval", {"step": 100, "eval_loss": 0.4, "accuracy": 0.8125}),
            ("state", {"state": "finished", "step": 100}),
        ],
        age=50,
    )
    _run(
        tmp_path,
        "stopped",
        [*started, *_trained(7), ("state", {"state": "stopped", "step": 7, "message": "SIGTERM: stopped at step 7"})],
        age=40,
    )
    _run(tmp_path, "crashed", [*started, *_trained(12)], age=30)
    _run(
        tmp_path,
        "failed",
        [
            ("state", {"state": "loading", "step": 0}),
            ("state", {"state": "error", "step": 0, "message": "no such model"}),
        ],
        age=20,
    )
    live = _run(tmp_path, "live", [*started, *_trained(3)], age=10)
    lock = RunLock(live)
    lock.acquire()
    try:
        infos = {i.name: i for i in list_runs(tmp_path)}
        assert [i.name for i in list_runs(tmp_path)] == ["live", "failed", "crashed", "stopped", "finished"]
        assert {n: i.state for n, i in infos.items()} == {
            "live": "live",
            "failed": "error",
            "crashed": "crashed",
            "stopped": "stopped",
            "finished": "finished",
        }
        assert infos["live"].pid == os.getpid() and is_live(live) and newest_live_run(tmp_path) == live
        assert (
            infos["finished"].step,
            infos["finished"].total_steps,
            infos["finished"].metric,
            infos["finished"].metric_value,
        ) == (100, 100, "accuracy", 0.8125)
        assert infos["crashed"].step == 12 and infos["crashed"].loss == 0.88 and infos["crashed"].metric is None
        assert infos["stopped"].message == "SIGTERM: stopped at step 7" and infos["failed"].message == "no such model"
    finally:
        lock.release()
    assert not is_live(live) and run_info(live).state == "crashed" and newest_live_run(tmp_path) is None
    assert run_info(tmp_path / "nothing") is None


def test_a_line_cut_short_by_a_crash_is_ignored(tmp_path):
    folder = _run(tmp_path, "run", [("state", {"state": "training", "step": 0}), *_trained(4)])
    with (folder / "events.jsonl").open("ab") as f:
        f.write(b'{"type": "step", "step": 5, "lo')
    assert run_info(folder).step == 4 and run_info(folder).state == "crashed"
    assert [e["step"] for e in read_history(folder) if e["type"] == "step"] == [1, 2, 3, 4]


def test_history_after_a_resume_drops_what_the_killed_engine_wrote_past_the_checkpoint(tmp_path):
    events = [
        ("state", {"state": "training", "step": 0}),
        *_trained(13, loss=1.0),
        ("checkpoint", {"step": 10, "path": "x"}),
        ("state", {"state": "loading", "step": 0}),
        ("resumed", {"step": 10, "checkpoint": "step-0000010"}),
        ("state", {"state": "training", "step": 10}),
        *_trained(5, start=11, loss=2.0),
    ]
    folder = _run(tmp_path, "run", events)
    steps = [(e["step"], e["loss"]) for e in read_history(folder) if e["type"] == "step"]
    assert [s for s, _ in steps] == list(range(1, 16))
    assert steps[10] == (11, 2.0 - 11 / 100)  # the resumed run's step 11, not the lost one
    assert run_info(folder).step == 15


def test_big_logs_are_read_from_the_end(tmp_path):
    folder = _run(
        tmp_path,
        "run",
        [
            ("state", {"state": "training", "step": 0}),
            *_trained(20_000),
            ("state", {"state": "stopped", "step": 20_000}),
        ],
    )
    assert (folder / "events.jsonl").stat().st_size > 1 << 20
    info = run_info(folder)
    assert (info.state, info.step) == ("stopped", 20_000)


def test_spu_runs_prints_a_table_and_a_resume_hint(tmp_path):
    _run(
        tmp_path,
        "mini-sst2",
        [
            ("state", {"state": "training", "step": 0}),
            *_trained(40),
            ("eval", {"step": 40, "eval_loss": 0.5, "accuracy": 0.75}),
        ],
        steps=2000,
    )
    result = CliRunner().invoke(app, ["runs", str(tmp_path)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "mini-sst2" in line)
    for cell in ("crashed", "40/2000", "0.6000", "accuracy 0.7500 @40"):
        assert cell in row
    assert f"spu train --resume {tmp_path / 'mini-sst2'}" in result.output
    empty = CliRunner().invoke(app, ["runs", str(tmp_path / "mini-sst2" / "nope")])
    assert empty.exit_code == 2 and "no such folder" in empty.output


def test_spu_runs_at_80_columns_keeps_the_name_whole_and_lists_the_methods(tmp_path):
    """The name is what `spu-tui attach` takes: never cut; the other columns wrap instead."""
    name = "minilm-sst2-lora-frozen-prefix-20261207-143201"
    policy = {"peft": {"method": "lora", "r": 8}, "freeze": [{"units": ["embeddings"], "trainable": False}]}
    _run(
        tmp_path,
        name,
        [
            ("state", {"state": "training", "step": 0}),
            ("policy", {"step": 0, "policy": policy}),
            *_trained(40),
            ("eval", {"step": 40, "eval_loss": 0.5, "accuracy": 0.75}),
            ("state", {"state": "finished", "step": 40}),
        ],
    )
    result = CliRunner().invoke(app, ["runs", str(tmp_path)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert any(name in line for line in lines), result.output
    assert "methods" in result.output and "LoRA r8" in " ".join(" ".join(lines).split())
