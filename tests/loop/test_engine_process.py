"""The engine as its own process: a client attaches over the socket and steers it live."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from spu_engine.core.policy import Policy
from spu_engine.core.spawn import spawn_engine
from spu_engine.core.transport import EngineClient
from spu_engine.loop.engine import EngineConfig
from support import SST2

pytestmark = pytest.mark.process  # every test here starts an engine process


@pytest.fixture
def live_engine(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = EngineConfig(
        model=str(tiny_model_dir),
        data=str(SST2),
        steps=5000,
        batch_size=8,
        max_length=32,
        lr=1e-3,
        warmup=0,
        eval_every=0,
        stats_every=1,
        max_train_samples=256,
        max_eval_samples=32,
        threads=1,
    )
    proc = spawn_engine(config, Policy(), run_dir)
    client = EngineClient(run_dir / "control.sock").connect(timeout=60)
    yield proc, client, run_dir
    client.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _units_after(client, step):
    return client.wait_for(lambda e: e["type"] == "units" and e["step"] > step, 60)


def test_freeze_and_unfreeze_block0_live(live_engine):
    proc, client, run_dir = live_engine
    client.wait_for(lambda e: e["type"] == "step" and e["step"] >= 3, 60)
    cid = client.send("change", change={"freeze": [{"layers": [0], "trainable": False}]})
    ack = client.wait_for(lambda e: e["type"] == "ack" and e["id"] == cid, 30)
    assert ack["ok"], ack
    frozen_at = after = ack["step"]
    for i in range(3):  # from the very next optimizer step on, block 0's weights do not move
        ev = _units_after(client, after)
        if i == 0:
            assert ev["step"] == after + 1
        after = ev["step"]
        assert ev["units"]["block0"]["update_ratio"] == 0.0
        assert ev["units"]["block0"]["trainable"] == 0.0
        for unit in ("block1", "block2", "block3", "head"):
            assert ev["units"][unit]["update_ratio"] > 0.0, unit
    cid = client.send("change", change={"freeze": [{"layers": [0], "trainable": True}]})
    ack = client.wait_for(lambda e: e["type"] == "ack" and e["id"] == cid, 30)
    ev = _units_after(client, ack["step"])
    assert ev["step"] == ack["step"] + 1 and ev["units"]["block0"]["update_ratio"] > 0.0
    client.send("stop", checkpoint=False)
    client.wait_for(lambda e: e["type"] == "state" and e["state"] == "stopped", 60)
    assert proc.wait(30) == 0
    # the run folder recorded both changes with their steps, replayable as a policy
    from spu_engine.core.policy_files import load_policy

    timeline = load_policy(run_dir / "policy.yaml").timeline
    assert [(e.step, e.freeze[0].trainable) for e in timeline] == [(frozen_at, False), (ack["step"], True)]


def test_socket_is_private_and_run_folder_is_locked(live_engine, tiny_model_dir):
    proc, client, run_dir = live_engine
    hello = client.wait_for(lambda e: e["type"] == "hello", 30)
    assert hello["pid"] == proc.pid
    assert os.stat(run_dir / "control.sock").st_mode & 0o777 == 0o600
    assert os.stat(run_dir).st_mode & 0o777 == 0o700
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "spu_engine.cli",
            "train",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(SST2),
            "--run-dir",
            str(run_dir),
            "--steps",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 2
    assert f"run folder {run_dir} is in use by a live engine (pid {proc.pid})" in second.stderr
    assert "Traceback" not in second.stderr


def test_bad_command_gets_error_event_and_training_goes_on(live_engine):
    _proc, client, _run_dir = live_engine
    client.send_raw(b'{"cmd": "change", "change": {"freeze": [{"layers": "x", "trainable": false}]}}\n')
    err = client.wait_for(lambda e: e["type"] == "error", 30)
    assert "change: change.freeze.0.layers" in err["message"] and "'x' is not a block index" in err["message"]
    cid = client.send("change", change={"freeze": [{"layers": [9], "trainable": False}]})
    ack = client.wait_for(lambda e: e["type"] == "ack" and e["id"] == cid, 30)
    assert not ack["ok"] and "block index 9 is out of range; this model has 4 blocks" in ack["message"]
    step = client.wait_for(lambda e: e["type"] == "step", 30)["step"]
    client.wait_for(lambda e: e["type"] == "step" and e["step"] > step + 2, 30)
