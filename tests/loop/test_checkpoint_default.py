"""A run started with the defaults checkpoints on its own (every ``checkpoint_minutes`` of training), so a crash
leaves a checkpoint to resume from; ``checkpoint_every: 0`` still means none, said at the start."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from spu_engine.core.config import RunSettings
from spu_engine.core.policy import Policy
from spu_engine.core.runs import SOCKET, run_info
from spu_engine.core.spawn import spawn_engine
from spu_engine.core.transport import EngineClient
from spu_engine.loop.checkpoint_cadence import CheckpointCadence
from spu_engine.loop.engine import EngineConfig
from spu_engine.storage.checkpoint import list_checkpoints, read_state
from support import SST2


def test_the_default_checkpoints_every_ten_minutes_of_training():
    cadence = CheckpointCadence(RunSettings(task="classification"))
    assert cadence.describe() == "checkpoints every 10 minutes of training (checkpoint_minutes)"
    for _ in range(599):
        cadence.stepped(1.0)
    assert not cadence.due(599)
    cadence.stepped(1.0)
    assert cadence.due(600) and not cadence.due(601)  # the clock starts again


def test_checkpoint_every_wins_and_zero_is_off_said_aloud():
    assert CheckpointCadence(RunSettings(task="classification", checkpoint_every=5)).due(10)
    off = CheckpointCadence(RunSettings(task="classification", checkpoint_every=0))
    off.stepped(10_000.0)
    assert not off.due(5) and "a crash loses the run" in off.describe()


def test_many_ranks_follow_rank_0s_word():
    cadence = CheckpointCadence(RunSettings(task="classification", checkpoint_minutes=1))
    cadence.stepped(100.0)  # this rank's clock says due, rank 0's did not
    cadence.agree(False)
    assert not cadence.due(1)
    cadence.agree(True)
    assert cadence.due(2)


def _events(run_dir):
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_bytes().splitlines() if line.strip()]


def _eventually(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.process
def test_a_run_with_default_checkpointing_killed_resumes_from_its_checkpoint(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = EngineConfig(  # the defaults' checkpointing, the interval made short: checkpoint_every left unset
        model=str(tiny_model_dir),
        data=str(SST2),
        steps=100_000,
        batch_size=8,
        max_length=32,
        eval_every=0,
        stats_every=50,
        max_train_samples=256,
        max_eval_samples=32,
        threads=1,
        checkpoint_minutes=0.002,
    )
    assert config.checkpoint_every is None and config.keep_checkpoints == 3
    proc = spawn_engine(config, Policy(), run_dir)
    try:  # more checkpoints than are kept
        _eventually(
            lambda: (
                (run_dir / "events.jsonl").exists() and sum(e["type"] == "checkpoint" for e in _events(run_dir)) >= 5
            ),
            180,
        )
    finally:
        proc.kill()  # SIGKILL: no last checkpoint
        proc.wait(10)
    assert run_info(run_dir).state == "crashed"
    kept = list_checkpoints(run_dir / "checkpoints")
    assert 1 <= len(kept) <= 3
    resume_at = read_state(kept[-1])["step"]
    assert resume_at > 0
    log = (tmp_path / "resume.out").open("wb")
    resumed = subprocess.Popen(
        [sys.executable, "-m", "spu_engine.cli", "train", "--resume", str(run_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        client = EngineClient(run_dir / SOCKET).connect(60)
        client.wait_for(lambda e: e["type"] == "step" and e["step"] > resume_at, 120)
    finally:
        resumed.kill()
        resumed.wait(10)
        log.close()
    marker = next(e for e in _events(run_dir) if e["type"] == "resumed")
    assert marker["step"] == resume_at
