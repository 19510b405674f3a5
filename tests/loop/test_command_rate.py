"""A flood of checkpoint commands cannot stall training: a checkpoint of a step already written (nothing changed
since) is the same checkpoint, answered with its path; what costs time has its own rate, refused with when to retry."""

from __future__ import annotations

import pytest
import torch

from spu_engine.core.policy import Change, FreezeRule
from spu_engine.core.protocol import ChangeCmd, CheckpointCmd, EvaluateCmd
from spu_engine.loop.command_rate import CommandRate
from spu_engine.loop.lifecycle import CommandRefused


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(engine, *commands) -> list[dict]:
    """Every command taken at the first boundary (step 0), then the run to its end; the events it emitted."""
    events: list[dict] = []
    engine.sinks.append(lambda _line, ev: events.append(ev))
    for cmd in commands:
        engine.submit(cmd)
    assert engine.run() == "finished"
    return events


def test_a_flood_of_checkpoints_at_one_step_writes_one(make_engine, tmp_path):
    engine = make_engine(steps=1, run_dir=tmp_path / "run", checkpoint_every=0)
    events = _run(engine, *(CheckpointCmd(cmd="checkpoint", id=i) for i in range(40)))
    written = [e for e in events if e["type"] == "checkpoint"]
    assert [e["step"] for e in written] == [0, 1]  # the flood's one, and the run's last
    acks = [e for e in events if e["type"] == "ack"]
    assert len(acks) == 40 and all(a["ok"] for a in acks)
    path = written[0]["path"]
    assert acks[0]["message"] == path
    same = f"the same checkpoint: step 0 is written and nothing changed since: {path}"
    assert all(a["message"] == same for a in acks[1:])


def test_a_change_between_two_checkpoints_makes_the_second_a_new_one(make_engine, tmp_path):
    engine = make_engine(steps=1, run_dir=tmp_path / "run", checkpoint_every=0)
    change = Change(freeze=[FreezeRule(layers=[0], trainable=False)])
    events = _run(
        engine,
        CheckpointCmd(cmd="checkpoint"),
        ChangeCmd(cmd="change", change=change),
        CheckpointCmd(cmd="checkpoint"),
        CheckpointCmd(cmd="checkpoint"),
    )
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [0, 0, 1]
    acks = [e["message"] for e in events if e["type"] == "ack" and e["cmd"] == "checkpoint"]
    assert acks[2].startswith("the same checkpoint: step 0")


def test_checkpoints_past_their_rate_are_refused_with_when_to_retry(make_engine, tmp_path):
    engine = make_engine(steps=1, run_dir=tmp_path / "run", checkpoint_every=0)
    change = Change(freeze=[FreezeRule(layers=[0], trainable=False)])
    unfreeze = Change(freeze=[FreezeRule(layers=[0], trainable=True)])
    commands = []
    for i in range(5):  # each change makes the next checkpoint a new one
        commands += [ChangeCmd(cmd="change", change=change if i % 2 else unfreeze), CheckpointCmd(cmd="checkpoint")]
    events = _run(engine, *commands, EvaluateCmd(cmd="evaluate"))
    acks = [e for e in events if e["type"] == "ack" and e["cmd"] == "checkpoint"]
    assert [a["ok"] for a in acks] == [True, True, True, False, False]
    assert acks[3]["message"] == (
        "checkpoint refused: the engine does at most 3 in a row, then one every 10 s, so that training goes on; "
        "try again in 10 s"
    )
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [0, 0, 0, 1]
    assert [e["ok"] for e in events if e["type"] == "ack" and e["cmd"] == "evaluate"] == [True]  # its own rate


def test_the_rate_refills_on_the_boundary_clock():
    rate = CommandRate("evaluate", burst=2, every_s=10.0)
    rate.take(100.0)
    rate.take(100.0)
    with pytest.raises(CommandRefused, match="try again in 10 s"):
        rate.take(100.0)
    with pytest.raises(CommandRefused, match="try again in 6 s"):
        rate.take(104.0)
    rate.take(110.0)
    with pytest.raises(CommandRefused):
        rate.take(110.0)


def test_evaluations_at_one_step_with_nothing_changed_run_once(make_engine, tmp_path):
    engine = make_engine(steps=1, run_dir=tmp_path / "run", checkpoint_every=0, eval_every=0)
    change = Change(freeze=[FreezeRule(layers=[0], trainable=False)])
    evaluate = [EvaluateCmd(cmd="evaluate", id=i) for i in range(4)]
    events = _run(engine, *evaluate[:3], ChangeCmd(cmd="change", change=change), evaluate[3])
    assert [e["step"] for e in events if e["type"] == "eval"][:2] == [0, 0]  # the first, and the one after the change
    acks = [e for e in events if e["type"] == "ack" and e["cmd"] == "evaluate"]
    assert (
        all(a["ok"] for a in acks)
        and [a["message"] for a in acks[1:3]]
        == ["the same evaluation: step 0 is evaluated and nothing changed since"] * 2
    )
    assert acks[3]["message"] == ""
