"""A console change that runs out of memory, applying it or in the first step after it, is rolled back with a
message that names it and the memory figures, and training goes on (the out-of-memory errors are injected: CPU)."""

from __future__ import annotations

import threading

import torch

from spu_engine.core.policy import Change, Policy, TimelineEntry
from spu_engine.core.protocol import ChangeCmd

LORA = Change(
    set={"peft": {"method": "lora", "r": 16}}
)  # under the tiny model's 32-wide layers: refused as oversized otherwise
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def run_to_the_end(engine, timeout: float = 60.0) -> tuple[str | None, list[dict]]:
    """Run in a thread (a pause would block), recording the events; the final state, or None if it never ended."""
    events: list[dict] = []
    engine.sinks.append(lambda _line, ev: events.append(ev))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(state=engine.run()), daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        engine.request_stop_now()
    return result.get("state"), events


def test_a_change_whose_first_step_runs_out_of_memory_is_rolled_back_and_training_goes_on(make_engine):
    engine = make_engine(steps=4)
    original, calls = engine.per_sample_loss, {"n": 0}

    def per_sample_loss(batch):
        calls["n"] += 1
        if calls["n"] == 1:  # the first step, right after the change at the first boundary
            assert any(".lora_" in n for n in engine.params)
            raise torch.OutOfMemoryError(OOM)
        return original(batch)

    engine.per_sample_loss = per_sample_loss
    engine.submit(ChangeCmd(cmd="change", id="c1", change=LORA))
    state, events = run_to_the_end(engine)
    assert state == "finished" and engine.step == 4  # no pause: the failed step did not count, four more did
    assert engine.current.peft.method == "none" and not any(".lora_" in n for n in engine.params)
    assert not any(g.get("name") == "peft:lora" for g in engine.optimizer.param_groups)
    assert engine.replayable_policy().timeline == [] and engine.record.undoable == []  # replays as never made
    ack = next(e for e in events if e["type"] == "ack")
    assert ack["ok"] and ack["step"] == 0
    error = next(e for e in events if e["type"] == "error")
    assert error["kind"] == "oom" and error["step"] == 0
    message = error["message"]
    assert "out of memory in the first step after the change at step 0 (peft: method=lora, r=16)" in message
    assert OOM in message and "rolled back to the policy before it, training goes on" in message
    assert "estimated RAM" in message and "without it" in message and "with it" in message and "available" in message
    rollback = [e for e in events if e["type"] == "policy" and e["source"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["policy"]["peft"]["method"] == "none"
    assert not any(e["type"] == "state" and e["state"] == "paused" for e in events)


def test_a_change_that_runs_out_of_memory_while_applied_is_refused_and_training_goes_on(make_engine, monkeypatch):
    from spu_engine.methods.peft import inject

    real = inject.inject_adapter_in_model

    def half_way(config, model):  # the tensors land, then the device is full; a shape-only copy plans as before
        real(config, model)
        if not any(p.is_meta for p in model.parameters()):
            raise torch.OutOfMemoryError(OOM)
        return model

    monkeypatch.setattr(inject, "inject_adapter_in_model", half_way)
    engine = make_engine(steps=3)
    names = list(engine.params)
    engine.submit(ChangeCmd(cmd="change", id="c1", change=LORA))
    state, events = run_to_the_end(engine)
    assert state == "finished" and engine.step == 3
    assert list(engine.params) == names and not any("lora" in n for n, _ in engine.model.named_modules())
    ack = next(e for e in events if e["type"] == "ack")
    assert not ack["ok"]
    assert ack["message"].startswith("change: out of memory applying it at step 0 (peft: method=lora, r=16): ")
    assert "nothing changed, training goes on; estimated RAM" in ack["message"]
    assert any(e["type"] == "error" and e["message"] == ack["message"] for e in events)


def test_a_timeline_change_keeps_the_plain_out_of_memory_pause(make_engine):
    policy = Policy(timeline=[TimelineEntry(step=0, **LORA.model_dump())])
    engine = make_engine(steps=3, policy=policy)
    original, calls = engine.per_sample_loss, {"n": 0}

    def per_sample_loss(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError(OOM)
        return original(batch)

    engine.per_sample_loss = per_sample_loss
    state, events = run_to_the_end(engine, timeout=5.0)  # the policy asked for this change: paused, not rolled back
    assert state is None and any(e["type"] == "state" and e["state"] == "paused" for e in events)
    assert engine.current.peft.method == "lora"
