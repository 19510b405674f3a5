"""A pruning schedule changed mid-run through the engine's socket (a real engine process)."""

from __future__ import annotations

import itertools

import pytest

from spu_engine.core.policy_files import load_policy, parse_policy
from spu_engine.core.spawn import spawn_engine
from spu_engine.core.transport import EngineClient
from spu_engine.loop.engine import EngineConfig
from support import SST2

pytestmark = pytest.mark.process  # every test here starts an engine process


@pytest.fixture
def pruning_engine(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = EngineConfig(
        model=str(tiny_model_dir),
        data=str(SST2),
        task="classification",
        steps=200,
        batch_size=4,
        max_length=32,
        lr=1e-3,
        warmup=0,
        eval_every=0,
        stats_every=2,
        max_train_samples=128,
        max_eval_samples=16,
        threads=1,
    )
    policy = parse_policy(
        {
            "pruning": {
                "method": "magnitude",
                "schedule": {"start_step": 0, "end_step": 40, "every": 1, "final_sparsity": 0.8},
            }
        }
    )
    proc = spawn_engine(config, policy, run_dir)
    client = EngineClient(run_dir / "control.sock").connect(timeout=60)
    yield proc, client, run_dir
    client.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_schedule_change_through_socket_continues_without_jump(pruning_engine):
    proc, client, run_dir = pruning_engine
    steps: dict[int, dict] = {}
    paused = False
    while not paused:
        ev = client.wait_for(lambda e: e["type"] in ("step", "state"), 120)
        if ev["type"] == "step":
            steps[ev["step"]] = ev["pruning"]
            if ev["step"] == 4:
                client.send("pause")
        paused = ev["type"] == "state" and ev["state"] == "paused"
    paused_at = max(steps)
    before = steps[paused_at]["sparsity"]
    assert 0.1 < before < 0.8
    new_end = paused_at + 6
    cid = client.send("change", change={"set": {"pruning": {"schedule": {"final_sparsity": 0.4, "end_step": new_end}}}})
    ack = client.wait_for(lambda e: e["type"] == "ack" and e["id"] == cid, 30)
    assert ack["ok"], ack
    client.send("resume")
    while max(steps, default=0) < new_end + 2:
        ev = client.wait_for(lambda e: e["type"] == "step", 120)
        steps[ev["step"]] = ev["pruning"]
    series = [steps[s]["sparsity"] for s in sorted(steps) if s > paused_at]
    assert abs(series[0] - before) < 0.03  # the new ramp starts from the current sparsity
    assert all(abs(b - a) < 0.1 for a, b in itertools.pairwise(series))  # no jump
    assert steps[new_end + 1]["sparsity"] == pytest.approx(0.4, abs=1e-3)  # masks of step new_end
    assert steps[new_end + 1]["target"] == pytest.approx(0.4)
    client.send("stop")
    client.wait_for(lambda e: e["type"] == "state" and e["state"] == "stopped", 60)
    proc.wait(30)
    replay = load_policy(run_dir / "policy.yaml")  # the change is in the timeline, at its step
    assert [(e.step, e.set["pruning"]["schedule"]["final_sparsity"]) for e in replay.timeline] == [(ack["step"], 0.4)]
