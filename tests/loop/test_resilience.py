"""Faults inside one engine: non-finite loss or gradient, out-of-memory, exact resume from a checkpoint."""

from __future__ import annotations

import threading

import pytest
import torch

from spu_engine.core.policy import Change, FreezeRule, Policy, TimelineEntry
from spu_engine.core.protocol import ResumeCmd
from spu_engine.storage.checkpoint import latest_checkpoint, read_state


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread is many times faster than an oversubscribed two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _recorder(engine) -> list[dict]:
    events: list[dict] = []
    engine.sinks.append(lambda _line, ev: events.append(ev))
    return events


def _poison_loss(engine, calls: set[int]):
    """Make the forward pass of the given call numbers (1-based) return NaN."""
    original = engine.per_sample_loss
    count = {"n": 0}

    def per_sample_loss(batch):
        count["n"] += 1
        loss = original(batch)
        return loss * float("nan") if count["n"] in calls else loss

    engine.per_sample_loss = per_sample_loss


def _all_finite(engine) -> bool:
    return all(torch.isfinite(p).all() for p in engine.model.parameters())


def _start(engine) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(state=engine.run()), daemon=True)
    thread.start()
    return thread, result


def _wait(events: list[dict], predicate, timeout: float = 30.0) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in list(events):
            if predicate(ev):
                return ev
        time.sleep(0.02)
    raise TimeoutError("no such event")


def test_nan_loss_skip_drops_only_that_batch(make_engine):
    """The update is skipped on the device (as AMP's scaler skips one), the step counts, and the host says so when the
    values arrive, one step later, without ever waiting for them."""
    engine = make_engine(steps=6, policy=Policy(faults={"on_nonfinite": "skip"}))
    events = _recorder(engine)
    _poison_loss(engine, {3})
    assert engine.run() == "finished"
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["kind"] == "nonfinite" and errors[0]["action"] == "skip"
    assert (
        errors[0]["step"] == 3 and "batch of step 3" in errors[0]["message"] and "batch skipped" in errors[0]["message"]
    )
    assert errors[0]["loss"] == "nan" and errors[0]["weights"] == []
    # NaN loss: the gradients of every unit that took part are NaN, and none of them reached the weights
    assert set(errors[0]["units"]) == {u.name for u in engine.units}
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    assert (
        steps[2]["skipped"] and steps[2]["loss"] is None and all(e["loss"] > 0 for i, e in enumerate(steps) if i != 2)
    )
    assert events.index(steps[2]) < events.index(errors[0]) < events.index(steps[3])  # in the order it happened
    assert _all_finite(engine)


def test_a_skipped_update_leaves_weights_and_adam_state_as_they_were(make_engine):
    engine = make_engine(steps=4)
    engine.train_step()
    weights = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    state = {n: engine.optimizer.state[p]["exp_avg"].clone() for n, p in engine.model.named_parameters()}
    adam_steps = {int(engine.optimizer.state[p]["step"]) for p in engine.model.parameters()}
    _poison_loss(engine, {1})
    fields = engine.train_step()
    assert fields["skipped"] and engine.step == 2
    for n, p in engine.model.named_parameters():
        assert torch.equal(p, weights[n]) and torch.equal(engine.optimizer.state[p]["exp_avg"], state[n]), n
    assert {int(engine.optimizer.state[p]["step"]) for p in engine.model.parameters()} == adam_steps


def test_finite_loss_with_inf_gradient_names_the_unit(make_engine):
    engine = make_engine(steps=3, grad_clip=0.0)
    events = _recorder(engine)
    target = dict(engine.model.named_parameters())[engine.units.units[2].params[0]]
    hook = target.register_hook(lambda g: g * float("inf"))
    engine.train_step()
    hook.remove()
    error = next(e for e in events if e["type"] == "error")
    assert error["units"] == [engine.units.units[2].name]
    assert "non-finite gradient (loss" in error["message"] and engine.step == 1
    assert all(p.grad is None for p in engine.model.parameters()) and _all_finite(engine)
    engine.train_step()
    assert engine.step == 2 and _all_finite(engine)


def test_nan_loss_pause_waits_for_resume(make_engine):
    engine = make_engine(steps=4, stats_every=100, policy=Policy(faults={"on_nonfinite": "pause"}))
    events = _recorder(engine)
    _poison_loss(engine, {2})
    thread, result = _start(engine)
    paused = _wait(events, lambda e: e["type"] == "state" and e["state"] == "paused")
    assert paused["step"] == 3 and "non-finite loss" in paused["message"] and "batch of step 2" in paused["message"]
    assert engine.step == 3 and thread.is_alive()  # known one step late: the step after it ran
    engine.submit(ResumeCmd(cmd="resume"))
    thread.join(30)
    assert result["state"] == "finished" and engine.step == 4 and _all_finite(engine)


def test_nan_loss_stop_checkpoints_the_last_good_state(make_engine, tmp_path):
    engine = make_engine(
        steps=10, stats_every=100, run_dir=tmp_path / "run", policy=Policy(faults={"on_nonfinite": "stop"})
    )
    events = _recorder(engine)
    _poison_loss(engine, {4})
    assert engine.run() == "stopped" and engine.exit_code == 1
    assert engine.step == 5 and _all_finite(engine)  # step 4's update was skipped; step 5 ran before the host knew
    final = [e for e in events if e["type"] == "state"][-1]
    assert final["state"] == "stopped" and "non-finite loss" in final["message"]
    assert read_state(latest_checkpoint(tmp_path / "run" / "checkpoints"))["step"] == 5


def test_skip_turns_into_stop_when_every_batch_is_nonfinite(make_engine):
    from spu_engine.loop.faults import MAX_NONFINITE_SKIPS

    engine = make_engine(steps=50, stats_every=100)
    events = _recorder(engine)
    _poison_loss(engine, set(range(3, 1000)))
    assert engine.run() == "stopped" and engine.exit_code == 1
    errors = [e for e in events if e["type"] == "error"]
    actions = [e["action"] for e in errors]
    assert actions[: MAX_NONFINITE_SKIPS - 1] == ["skip"] * (MAX_NONFINITE_SKIPS - 1)
    assert actions[MAX_NONFINITE_SKIPS - 1] == "stop" and "in a row" in errors[MAX_NONFINITE_SKIPS - 1]["message"]
    # the stop is decided when the tenth bad step's values arrive, after the step that followed it (also bad)
    assert len(errors) <= MAX_NONFINITE_SKIPS + 1 and engine.step == 2 + MAX_NONFINITE_SKIPS + 1
    assert _all_finite(engine)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("MPS backend out of memory"),
    ],
)
def test_out_of_memory_frees_pauses_and_suggests_a_smaller_batch(make_engine, error):
    engine = make_engine(steps=5, batch_size=8)
    events = _recorder(engine)
    original = engine.per_sample_loss
    calls = {"n": 0}

    def per_sample_loss(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            loss = original(batch).mean()
            loss.backward()  # leave gradients behind, as a backward that ran out of memory half-way does
            raise error
        return original(batch)

    engine.per_sample_loss = per_sample_loss
    thread, result = _start(engine)
    paused = _wait(events, lambda e: e["type"] == "state" and e["state"] == "paused")
    oom = next(e for e in events if e["type"] == "error")
    assert oom["kind"] == "oom" and oom["suggested"] == {"batch_size": 4} and oom["step"] == 2
    assert "out of memory during training step at step 2 (batch_size 8)" in oom["message"]
    assert "--batch-size 4" in oom["message"] and paused["message"] == oom["message"]
    assert engine.step == 2 and all(p.grad is None for p in engine.model.parameters())
    engine.submit(ResumeCmd(cmd="resume"))
    thread.join(30)
    assert result["state"] == "finished" and engine.step == 5


def test_out_of_memory_in_evaluation_suggests_a_smaller_eval_batch(make_engine):
    engine = make_engine(steps=2, eval_every=1, eval_batch_size=64)
    events = _recorder(engine)

    def evaluate(model, batches):
        raise torch.OutOfMemoryError("CUDA out of memory")

    engine.task.evaluate = evaluate
    try:
        thread, result = _start(engine)
        _wait(events, lambda e: e["type"] == "state" and e["state"] == "paused")
        oom = next(e for e in events if e["type"] == "error")
        assert oom["suggested"] == {"eval_batch_size": 32} and engine.model.training
        engine.submit(ResumeCmd(cmd="resume"))
        _wait(events, lambda e: e["type"] == "state" and e["state"] == "paused" and e["step"] == 2)
        engine.submit(ResumeCmd(cmd="resume"))
        thread.join(30)
        assert result["state"] == "finished"
    finally:
        del engine.task.evaluate  # the task object is shared by the fixture


def test_resume_restores_policy_timeline_optimizer_and_continues_identically(make_engine, tmp_path):
    policy = Policy(
        faults={"on_nonfinite": "pause"},
        timeline=[
            TimelineEntry(step=2, freeze=[FreezeRule(layers=[0], trainable=False)]),
            TimelineEntry(step=8, freeze=[FreezeRule(layers=[0], trainable=True)]),
        ],
    )
    straight = make_engine(steps=10, run_dir=tmp_path / "a", policy=policy, checkpoint_every=5)
    for _ in range(3):
        straight.boundary()
        straight.train_step()
    straight.apply_change(Change(freeze=[FreezeRule(match="*.bias", trainable=False)]), source="client")
    straight.run()  # steps 4..10 with a checkpoint at 5
    ckpt5 = tmp_path / "a" / "checkpoints" / "step-0000005"
    state = read_state(ckpt5)

    resumed = make_engine(steps=10, run_dir=tmp_path / "b", policy=policy)
    events = _recorder(resumed)
    resumed.resume_from(ckpt5)
    assert resumed.step == 5 and resumed.samples_seen == 40
    assert [(e.step, e.freeze[0].trainable) for e in resumed.recorded] == [(2, False), (3, False)]
    assert [e.step for e in resumed.pending] == [8]
    assert resumed.current.freeze == [
        FreezeRule(layers=[0], trainable=False),
        FreezeRule(match="*.bias", trainable=False),
    ]
    assert state["step"] == 5
    saved = torch.load(ckpt5 / "optimizer.pt", weights_only=True)
    live = resumed.optimizer.state_dict()
    assert saved["state"].keys() == live["state"].keys() and saved["state"]
    for key, tensors in saved["state"].items():
        for name, value in tensors.items():
            assert torch.equal(value, live["state"][key][name]), (key, name)
    assert any(e["type"] == "resumed" and e["step"] == 5 for e in events)
    resumed.run()
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    assert resumed.replayable_policy().timeline == straight.replayable_policy().timeline


def test_sigterm_flag_interrupts_evaluation_and_stops_after_a_checkpoint(make_engine, tmp_path):
    engine = make_engine(steps=100, run_dir=tmp_path / "run", eval_every=3, eval_batch_size=4)
    events = _recorder(engine)
    original = engine.task.collate

    def collate(features):
        if not engine.model.training:  # the signal lands in the middle of an evaluation
            engine.request_stop("SIGTERM")
        return original(features)

    engine.task.collate = collate
    try:
        assert engine.run() == "stopped"
    finally:
        del engine.task.collate
    assert engine.step == 3 and not any(e["type"] == "eval" for e in events)
    assert any(e["type"] == "log" and "evaluation at step 3 abandoned" in e["message"] for e in events)
    assert read_state(latest_checkpoint(tmp_path / "run" / "checkpoints"))["step"] == 3
    final = events[-1]
    assert (
        final["type"] == "state"
        and final["state"] == "stopped"
        and final["message"].startswith("SIGTERM: stopped at step 3")
    )
    assert _all_finite(engine)


class _FullDisk:
    """Writers that fail the way the real libraries do on a full disk, until ``free()``."""

    def __init__(self, monkeypatch) -> None:
        self.full = True
        self.monkeypatch = monkeypatch

    def free(self) -> None:
        self.full = False

    def checkpoints(self, writer: str) -> None:
        from safetensors import SafetensorError

        from spu_engine.storage import checkpoint as ckpt

        if writer == "safetensors":
            real, error = (
                ckpt.save_file,
                SafetensorError(
                    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
                ),
            )
            target, name = ckpt, "save_file"
        else:
            real, error = (
                ckpt.torch.save,
                RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4608 vs 4500"),
            )
            target, name = ckpt.torch, "save"

        def write(*args, **kwargs):
            if self.full:
                raise error
            return real(*args, **kwargs)

        self.monkeypatch.setattr(target, name, write)

    def files(self, name: str) -> None:
        """atomic_write_text's temporary files named ``name``* go to /dev/full: the kernel's own ENOSPC."""
        import os
        import tempfile

        real = tempfile.mkstemp

        def mkstemp(suffix=None, prefix=None, dir=None, text=False):
            if self.full and (prefix or "").startswith(name):
                return os.open("/dev/full", os.O_WRONLY), os.path.join(dir, prefix + "full")
            return real(suffix, prefix, dir, text)

        self.monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    def events(self, engine) -> None:
        """events.jsonl on /dev/full until freed."""
        real = engine.event_log.file
        dev_full = open("/dev/full", "wb", buffering=0)  # noqa: SIM115 - swapped in for the log file

        class Switch:
            def write(_self, data):
                return (dev_full if self.full else real).write(data)

            def close(_self):
                dev_full.close()
                real.close()

        engine.event_log.file = Switch()


def _params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


@pytest.mark.parametrize("writer, retry", [("safetensors", "resume"), ("torch.save", "checkpoint")])
def test_a_full_disk_at_a_checkpoint_pauses_keeps_the_newest_and_retries(
    make_engine, tmp_path, monkeypatch, writer, retry
):
    from spu_engine.core.protocol import CheckpointCmd
    from spu_engine.storage.checkpoint import list_checkpoints, verify

    engine = make_engine(steps=6, run_dir=tmp_path / "run", checkpoint_every=2, eval_every=6)
    events = _recorder(engine)
    disk = _FullDisk(monkeypatch)
    disk.free()
    disk.checkpoints(writer)
    original = engine.train_step

    def train_step(**how):  # the disk fills up during step 3
        out = original(**how)
        disk.full = disk.full or engine.step == 3
        return out

    engine.train_step = train_step
    thread, result = _start(engine)
    paused = _wait(events, lambda e: e["type"] == "state" and e["state"] == "paused")
    in_memory = _params(engine)
    assert paused["step"] == 4 and engine.step == 4 and thread.is_alive()
    assert "writing checkpoint step-0000004 failed (" in paused["message"] and " free of " in paused["message"]
    assert ("SafetensorError" if writer == "safetensors" else "inline_container.cc") in paused["message"]
    assert "press s (or resume) to retry" in paused["message"]
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["step-0000002"] and verify(folder / "step-0000002") is None
    engine.submit(ResumeCmd(cmd="resume") if retry == "resume" else CheckpointCmd(cmd="checkpoint"))
    _wait(events, lambda e: e["type"] == "ack" and e["cmd"] == retry)
    assert engine.step == 4 and thread.is_alive()  # still full: still paused, nothing lost
    disk.free()
    engine.submit(ResumeCmd(cmd="resume") if retry == "resume" else CheckpointCmd(cmd="checkpoint"))
    thread.join(60)
    assert result["state"] == "finished"
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2, 4, 6]
    assert [e["ok"] for e in events if e["type"] == "ack"] == [False, True]
    assert [p.name for p in list_checkpoints(folder)] == ["step-0000002", "step-0000004", "step-0000006"]
    loaded = make_engine(steps=6)
    loaded.resume_from(folder / "step-0000004")
    assert all(torch.equal(p, in_memory[n]) for n, p in loaded.model.named_parameters())  # the paused state, exactly


def test_a_full_disk_for_events_pauses_and_every_event_reaches_the_file(make_engine, tmp_path, monkeypatch):
    import json

    engine = make_engine(steps=5, run_dir=tmp_path / "run")
    events = _recorder(engine)
    disk = _FullDisk(monkeypatch)
    disk.free()
    disk.events(engine)
    original = engine.train_step

    def train_step(**how):
        out = original(**how)
        disk.full = disk.full or engine.step == 2
        return out

    engine.train_step = train_step
    thread, result = _start(engine)
    paused = _wait(events, lambda e: e["type"] == "state" and e["state"] == "paused")
    assert (
        paused["step"] == 3
        and "writing events.jsonl failed (OSError: [Errno 28] No space left on device" in paused["message"]
    )
    disk.free()
    engine.submit(ResumeCmd(cmd="resume"))
    thread.join(60)
    assert result["state"] == "finished"
    engine.close()
    written = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_bytes().splitlines()]
    startup, written = written[: len(written) - len(events)], written[len(written) - len(events) :]
    # said while the engine was built, before the recorder was attached: its phases and its notes (the pooling)
    assert all(e.get("phase") or e["type"] == "log" for e in startup) and any(e.get("phase") for e in startup)
    assert [(e["type"], e.get("step")) for e in written] == [
        (e["type"], e.get("step")) for e in events
    ]  # all, in order
    assert [e["step"] for e in written if e["type"] == "step"] == [1, 2, 3, 4, 5]


def test_a_full_disk_for_policy_yaml_pauses_and_the_change_stays_applied(make_engine, tmp_path, monkeypatch):
    from spu_engine.core.policy_files import load_policy
    from spu_engine.core.protocol import ChangeCmd

    engine = make_engine(steps=4, run_dir=tmp_path / "run")
    events = _recorder(engine)
    disk = _FullDisk(monkeypatch)
    disk.files(".policy.yaml.")
    rule = FreezeRule(layers=[0], trainable=False)
    engine.submit(ChangeCmd(cmd="change", change=Change(freeze=[rule])))
    thread, result = _start(engine)
    paused = _wait(events, lambda e: e["type"] == "state" and e["state"] == "paused")
    assert (
        paused["step"] == 0
        and "writing policy.yaml failed (OSError: [Errno 28] No space left on device" in paused["message"]
    )
    assert engine.current.freeze == [rule] and [e["ok"] for e in events if e["type"] == "ack"] == [True]
    disk.free()
    engine.submit(ResumeCmd(cmd="resume"))
    thread.join(60)
    assert result["state"] == "finished"
    assert load_policy(tmp_path / "run" / "policy.yaml").timeline[0].freeze == [rule]


def test_headless_with_nobody_there_it_retries_by_itself_and_sigterm_still_ends_it(make_engine, tmp_path, monkeypatch):
    engine = make_engine(steps=50, run_dir=tmp_path / "run", checkpoint_every=2)
    engine.write_retry_s = 0.05
    events = _recorder(engine)
    disk = _FullDisk(monkeypatch)
    disk.checkpoints("safetensors")
    thread, result = _start(engine)
    _wait(events, lambda e: e["type"] == "state" and e["state"] == "paused")
    _wait(
        events,
        lambda e: (
            e["type"] == "error" and e.get("kind") == "write" and sum(x.get("kind") == "write" for x in events) >= 3
        ),
    )
    disk.free()  # space again: the next retry writes it and training goes on, nobody pressed anything
    _wait(events, lambda e: e["type"] == "checkpoint" and e["step"] == 2)
    _wait(events, lambda e: e["type"] == "step" and e["step"] == 5)
    disk.full = True
    _wait(events, lambda e: e["type"] == "state" and e["state"] == "paused" and e["step"] == 6)
    engine.request_stop("SIGTERM")  # what the signal handler does
    thread.join(30)
    assert result["state"] == "stopped" and engine.exit_code == 1 and engine.step == 6
    final = events[-1]
    assert final["state"] == "stopped" and final["message"].startswith(
        "SIGTERM: stopped at step 6 without a checkpoint (writing checkpoint step-0000006 failed"
    )
    assert final["message"].endswith("the newest complete checkpoint is step-0000004")


def test_a_timeline_entry_the_engine_refuses_at_its_step_stops_the_run_instead_of_being_skipped(make_engine, tmp_path):
    """Validated at load, an entry can still be refused by the live state (removing adapters from a running model):
    a replay that skipped it would silently diverge, so the run stops after a checkpoint that keeps it pending."""
    policy = Policy(
        timeline=[
            TimelineEntry(step=1, set={"peft": {"method": "adapter", "size": 4}}),
            TimelineEntry(step=2, set={"peft": {"method": "none"}}),
        ]
    )
    engine = make_engine(steps=6, run_dir=tmp_path / "run", policy=policy)
    events = _recorder(engine)
    assert engine.run() == "stopped" and engine.exit_code == 1 and engine.step == 2
    assert events[-1]["message"].startswith("timeline entry at step 2 cannot be applied:")
    assert [e.step for e in engine.pending] == [2] and read_state(latest_checkpoint(tmp_path / "run" / "checkpoints"))[
        "pending"
    ][0]["step"] == 2
