"""Runs that survive, tested on a real engine process: lost clients, garbage on the socket, SIGTERM, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spu_engine.core.policy import FreezeRule, Policy, TimelineEntry
from spu_engine.core.runs import SOCKET, never_trained, read_history, run_info
from spu_engine.core.spawn import spawn_engine
from spu_engine.core.transport import EngineClient
from spu_engine.loop.engine import EngineConfig
from spu_engine.storage.checkpoint import list_checkpoints, read_state, verify
from support import SST2

pytestmark = pytest.mark.process  # every test here starts an engine process


def _config(model_dir: Path, **overrides) -> EngineConfig:
    settings = {
        "model": str(model_dir),
        "data": str(SST2),
        "steps": 100_000,
        "batch_size": 8,
        "max_length": 32,
        "lr": 1e-3,
        "warmup": 0,
        "eval_every": 0,
        "stats_every": 50,
        "max_train_samples": 256,
        "max_eval_samples": 32,
        "threads": 1,
    }
    return EngineConfig(**{**settings, **overrides})


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_bytes().splitlines() if line.strip()]


def _last_step(run_dir: Path) -> int:
    return max((e["step"] for e in _events(run_dir) if e["type"] == "step"), default=0)


def _eventually(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _garbage(rng: random.Random) -> list[bytes]:
    """1,000 lines no engine may act on: random bytes, wrong JSON types, wrong fields, absurd nesting, 10 MB."""
    wrong = [
        b"[1, 2, 3]",
        b'"pause"',
        b"42",
        b"null",
        b"{}",
        b'{"cmd": 7}',
        b'{"cmd": "nope"}',
        b'{"cmd": "pause", "extra": 1}',
        b'{"cmd": "stop", "checkpoint": "soon"}',
        b'{"cmd": "change", "change": {"freeze": [{"layers": "x"}]}}',
        b'{"cmd": "change", "change": {"set": {"optimizer": {}}}}',
        b'{"cmd": "export"}',
        b'{"cmd": "set_policy", "policy": 3}',
        b'{"cmd": "change", "change": {"freeze": [{"trainable": false}]}}',
        b'{"cmd": "resume", "id": [1]}',
        b"\xff\xfe{",
        b"{'cmd': 'stop'}",
    ]
    lines = [b"[" * 200_000 + b"]" * 200_000, b'{"cmd": "pause", "pad": "' + b"x" * (10 << 20) + b'"}']
    while len(lines) < 1000:
        if rng.random() < 0.5:
            lines.append(
                b"\xff" + bytes(rng.choice([b for b in range(256) if b != 10]) for _ in range(rng.randint(1, 300)))
            )
        else:
            lines.append(rng.choice(wrong))
    rng.shuffle(lines)
    return [line + b"\n" for line in lines]


def test_engine_outlives_clients_ignores_garbage_and_stops_cleanly_on_sigterm(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = spawn_engine(_config(tiny_model_dir), Policy(), run_dir)
    try:
        first = EngineClient(run_dir / SOCKET).connect(60)
        first.wait_for(lambda e: e["type"] == "step" and e["step"] >= 3, 120)
        rude = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a console killed with events unread
        rude.connect(str(run_dir / SOCKET))
        time.sleep(0.3)
        rude.close()
        first.close()
        alone_from = _last_step(run_dir)
        _eventually(lambda: _last_step(run_dir) >= alone_from + 20)  # nobody attached: still training

        again = EngineClient(run_dir / SOCKET).connect(10)
        hello = again.wait_for(lambda e: e["type"] == "hello", 10)
        assert hello["state"] == "training" and hello["step"] >= alone_from + 20 and hello["pid"] == proc.pid

        errors: list[dict] = []
        flooder = EngineClient(
            run_dir / SOCKET, on_event=lambda e: errors.append(e) if e["type"] == "error" else None
        ).connect(10)
        for line in _garbage(random.Random(0)):
            flooder.send_raw(line)
        cid = again.send("checkpoint")
        ack = again.wait_for(lambda e: e["type"] == "ack" and e["id"] == cid, 60)
        assert ack["ok"] and verify(Path(ack["message"])) is None
        again.wait_for(lambda e: e["type"] == "step" and e["step"] > ack["step"] + 5, 60)  # still training
        _eventually(lambda: len(errors) >= 1000, 30)
        assert len(errors) == 1000 and all(e["message"].startswith(("bad command", "message over")) for e in errors)
        assert sum("message over 1048576 bytes" in e["message"] for e in errors) == 1
        assert proc.poll() is None and _last_step(run_dir) > ack["step"]

        cid = again.send("pause")
        paused = again.wait_for(lambda e: e["type"] == "state" and e["state"] == "paused", 30)
        proc.send_signal(signal.SIGTERM)  # while paused
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    events = _events(run_dir)
    steps = [e["step"] for e in events if e["type"] == "step"]
    assert steps == list(range(1, paused["step"] + 1))  # the complete history, one event per step
    final = events[-1]
    assert (
        final["type"] == "state"
        and final["state"] == "stopped"
        and final["message"].startswith("SIGTERM: stopped at step")
    )
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    assert read_state(newest)["step"] == paused["step"] == final["step"]
    assert run_info(run_dir).state == "stopped" and not (run_dir / SOCKET).exists()
    assert os.stat(run_dir).st_mode & 0o777 == 0o700 and os.stat(run_dir / "checkpoints").st_mode & 0o777 == 0o700
    for path in [
        run_dir / n for n in ("events.jsonl", "engine.log", "config.json", "policy.yaml", "engine.lock")
    ] + list(newest.iterdir()):
        assert os.stat(path).st_mode & 0o777 == 0o600, path


def test_sigkill_then_resume_continues_exactly_from_the_newest_complete_checkpoint(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    policy = Policy(timeline=[TimelineEntry(step=2, freeze=[FreezeRule(layers=[0], trainable=False)])])
    proc = spawn_engine(_config(tiny_model_dir, checkpoint_every=5), policy, run_dir)
    try:
        _eventually(lambda: (run_dir / "events.jsonl").exists() and _last_step(run_dir) >= 16, 120)
    finally:
        proc.kill()  # SIGKILL: no checkpoint, no last words
        proc.wait(10)
    assert run_info(run_dir).state == "crashed"
    before = {e["step"]: e["loss"] for e in _events(run_dir) if e["type"] == "step"}
    *_, previous, newest = list_checkpoints(run_dir / "checkpoints")
    model_file = newest / "model.safetensors"
    os.truncate(model_file, model_file.stat().st_size // 2)  # as if the machine died mid-write
    truncated = model_file.stat().st_size
    (run_dir / "checkpoints" / ".tmp-step-0000099-x").mkdir()
    resume_at = read_state(previous)["step"]

    log = (tmp_path / "resume.out").open("wb")
    resumed = subprocess.Popen(
        [sys.executable, "-m", "spu_engine.cli", "train", "--resume", str(run_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        client = EngineClient(run_dir / SOCKET).connect(60)
        client.wait_for(lambda e: e["type"] == "step" and e["step"] >= resume_at + 3, 120)
        client.send("hello")
        hello = client.wait_for(lambda e: e["type"] == "hello", 30)
        assert hello["state"] == "training" and hello["step"] > resume_at
        replayable = Policy.model_validate(hello["policy"])
        assert (
            replayable.model_copy(update={"run": None, "machine": None}) == policy
        )  # the timeline came back with the checkpoint
        assert replayable.run is not None and replayable.run.checkpoint_every == 5
        resumed.send_signal(signal.SIGHUP)  # the terminal of this foreground `spu train` went away: keep training
        client.wait_for(lambda e: e["type"] == "step" and e["step"] >= hello["step"] + 10, 60)
        assert resumed.poll() is None
        resumed.send_signal(signal.SIGTERM)  # while training
        assert resumed.wait(60) == 0
    finally:
        if resumed.poll() is None:
            resumed.kill()
            resumed.wait(10)
        log.close()
    output = (tmp_path / "resume.out").read_text()
    assert f"skipping checkpoint {newest.name}: model.safetensors has" in output and "(truncated)" in output
    assert "removed half-written checkpoint .tmp-step-0000099-x" in output
    aside = run_dir / "checkpoints" / "unusable" / newest.name  # never deleted: moved aside with the reason
    assert f"moved unusable checkpoint {newest.name} to" in output
    assert any(
        e["type"] == "log" and e["message"].startswith(f"moved unusable checkpoint {newest.name} to {aside} (")
        for e in _events(run_dir)
    )
    assert (aside / "model.safetensors").stat().st_size == truncated
    assert "(truncated)" in (aside / "reason.txt").read_text() and (aside / "optimizer.pt").is_file()
    assert all(verify(p) is None for p in list_checkpoints(run_dir / "checkpoints"))  # step 15 is written anew, whole
    assert "Traceback" not in output

    events = _events(run_dir)
    marker = next(e for e in events if e["type"] == "resumed")
    assert marker["step"] == resume_at and marker["checkpoint"].endswith(previous.name)
    after = [e for e in events[events.index(marker) :] if e["type"] == "step"]
    assert after[0]["step"] == resume_at + 1
    # same weights, optimizer state, data position and dropout RNG: the same losses as before the kill
    for e in after[:3]:
        assert e["loss"] == before[e["step"]], (e["step"], e["loss"], before[e["step"]])
    history_steps = [e["step"] for e in read_history(run_dir) if e["type"] == "step"]
    assert history_steps == list(range(1, after[-1]["step"] + 1))
    assert (
        events[-1]["state"] == "stopped"
        and read_state(list_checkpoints(run_dir / "checkpoints")[-1])["step"] == after[-1]["step"]
    )


def test_sigterm_while_loading_stops_cleanly(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = spawn_engine(
        _config(tiny_model_dir, max_train_samples=None), Policy(), run_dir
    )  # tokenizing all of SST-2 takes a while
    try:
        _eventually(
            lambda: (run_dir / "events.jsonl").exists() and b'"loading"' in (run_dir / "events.jsonl").read_bytes(), 60
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    final = _events(run_dir)[-1]
    assert final["state"] == "stopped" and final["message"] == "SIGTERM: stopped while loading; nothing was trained"
    assert not (run_dir / "checkpoints").exists() and run_info(run_dir).state == "stopped"
    assert never_trained(run_dir) and not run_info(run_dir).trained  # spu-tui's folder stays: any command takes it


def test_sigterm_while_spu_train_loads_leaves_no_folder(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--data", SST2, "--batch-size", 8, "--max-length", 32, "--steps", 5]
    proc = subprocess.Popen(
        [sys.executable, "-m", "spu_engine.cli", "train", *map(str, args), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # tokenizing all of SST-2 takes a while
    try:
        _eventually(
            lambda: (run_dir / "events.jsonl").exists() and b'"loading"' in (run_dir / "events.jsonl").read_bytes(), 60
        )
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, stderr
    assert not run_dir.exists()  # before: a folder spu runs called stopped and --resume called "not a run folder"
    assert f"nothing was trained; removed {run_dir}" in stderr and "Traceback" not in stderr
