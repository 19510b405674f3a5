"""The console's engine session without Textual: commands out over a fake link, answers routed to the right callback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spu_engine.core.policy import Change, FreezeRule
from spu_tui.run_model import RunModel
from spu_tui.session import EngineSession, NotSent, PendingCommand


class FakeLink:
    """A link with no socket and no UI: it records what is sent and hands over what the test queues."""

    def __init__(self, connected: bool = True) -> None:
        self.connected = connected
        self.sent: list[tuple[str, dict]] = []
        self.queued: list[dict] = []
        self.woken = None

    def connect(self, target, timeout: float = 60.0) -> None:
        self.woken = target

    def drain(self) -> list[dict]:
        out, self.queued = self.queued, []
        return out

    def send(self, cmd: str, **fields) -> str | None:
        self.sent.append((cmd, fields))
        return f"c{len(self.sent)}"

    def close(self) -> None:
        self.connected = False


class Answers:
    """The callbacks an ``AnswerView`` offers, recorded in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def command_received(self, command: PendingCommand) -> None:
        self.calls.append(("received", command.id, command.section))

    def command_acknowledged(self, command: PendingCommand, ack: dict) -> None:
        self.calls.append(("ack", command.id, command.name, ack["ok"]))

    def command_previewed(self, command: PendingCommand, preview) -> None:
        self.calls.append(("preview", command.id, command.section, preview.trainable))

    def checkpoint_written(self, step: int) -> None:
        self.calls.append(("checkpoint", step))


def test_the_session_imports_no_textual():
    code = "import sys, spu_tui.session; print('textual' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "False"


def test_a_change_is_sent_and_each_answer_routed_to_its_callback_once():
    link = FakeLink()
    session = EngineSession(RunModel(), link, history=[])
    change = Change(freeze=[FreezeRule(units=["block0"], trainable=False)])
    wired = {"freeze": [{"units": ["block0"], "trainable": False}]}
    sent = session.send("change", rows=["block0"], section="freeze", change=wired)
    preview = session.preview(change, "pruning")
    assert [cmd for cmd, _ in link.sent] == ["change", "preview"] and preview is not None
    assert link.sent[1][1] == {"change": wired}, "a change goes as only what it sets"
    assert set(session.commands.in_flight) == {sent.id, preview.id}

    view = Answers()
    link.queued = [
        {"type": "received", "t": 1.0, "id": sent.id, "cmd": "change"},
        {"type": "received", "t": 1.1, "id": sent.id, "cmd": "change"},  # a repeat says nothing new
        {"type": "preview", "t": 1.2, "id": preview.id, "trainable": 10, "total": 20},
        {"type": "ack", "t": 1.3, "id": "c99", "cmd": "change", "ok": True},  # another console's command
        {"type": "checkpoint", "t": 1.4, "step": 7, "path": "checkpoints/step7"},
        {"type": "ack", "t": 1.5, "id": sent.id, "cmd": "change", "step": 7, "ok": False, "message": "no"},
    ]
    arrivals = session.take_events()
    assert len(arrivals.answers) == 5 and arrivals.checkpoints == [7] and arrivals.failed is None
    assert session.model.checkpoint_step == 7, "events go into the run model"
    session.route(arrivals, view)
    assert view.calls == [
        ("received", sent.id, "freeze"),
        ("preview", preview.id, "pruning", 10),
        ("ack", sent.id, "change", False),
        ("checkpoint", 7),
    ]
    assert session.commands.in_flight == {}


def test_events_already_drawn_from_the_history_are_skipped_and_an_engine_error_is_said():
    link = FakeLink()
    session = EngineSession(RunModel(), link, history=[{"type": "step", "t": 5.0, "step": 1, "loss": 0.5}])
    link.queued = [
        {"type": "step", "t": 5.0, "step": 1, "loss": 0.5},  # also in events.jsonl: drawn already
        {"type": "hello", "t": 4.0, "run": "r"},  # a fresh snapshot, whatever its time
        {"type": "state", "t": 6.0, "state": "error", "message": "out of memory"},
    ]
    arrivals = session.take_events()
    assert [ev["type"] for ev in arrivals.answers] == ["hello"] and arrivals.failed == "out of memory"
    assert session.model.step == 0 and not session.live


def test_no_engine_no_command():
    for session in (EngineSession(RunModel(), None, []), EngineSession(RunModel(), FakeLink(connected=False), [])):
        with pytest.raises(NotSent, match="no engine connected"):
            session.send("pause")
        assert session.preview(Change(), "pruning") is None, "a what-if is only a hint: no engine, no hint"
        assert session.commands.in_flight == {} and session.take_events().answers == []
    closed = FakeLink()
    closed.send = lambda cmd, **fields: None  # the socket closed under us
    with pytest.raises(NotSent, match="socket is closed"):
        EngineSession(RunModel(), closed, []).send("pause")
