"""The console's conversation with its engine, without Textual.

An ``EngineSession`` owns the link to the engine process.  It sends commands and
follows each until the engine answers it: *sent* (the console wrote it), then
*received* (the engine has it; it applies at the next step boundary), then
answered by an ack (``ok`` or refused, with the reason) or, for a preview, by
the preview itself.  The events that arrive are taken into the ``RunModel``;
the answers among them, and the checkpoints written, are handed to an
``AnswerView`` (the run screen), which shows each on the rows or the controls
section its command came from.  The session also knows when the engine last
said anything (its heartbeats included): a live engine that says nothing for
``SILENT_AFTER_S`` is silent (stopped, hung), and the header says so.  Nothing
here draws.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from spu_engine.core.policy import Change
from spu_engine.core.protocol import HEARTBEAT_S, CheckpointEvent, PreviewEvent, read_event
from spu_engine.core.run_states import ENDED
from spu_engine.core.runs import ENGINE_LOG
from spu_tui.run_model import RunModel

ANSWERS = ("ack", "received", "hello", "preview")  # events that answer the user: drawn at once
SILENT_AFTER_S = 3 * HEARTBEAT_S  # three heartbeats missed: the engine is silent, not quiet


class Wakeable(Protocol):
    """What a link wakes when events wait (in the console: the run screen, through a Textual message)."""

    def post_message(self, message: Any) -> bool: ...


class Link(Protocol):
    """What the console needs of an engine connection (``link.EngineLink``; tests script one)."""

    @property
    def connected(self) -> bool: ...

    def connect(self, target: Wakeable, timeout: float = 60.0) -> None:
        """Blocking (run it in a worker thread); from then on ``target`` is woken when events wait."""

    def drain(self) -> list[dict[str, Any]]:
        """Everything received since the last drain (UI thread)."""

    def send(self, cmd: str, **fields: Any) -> str | None:
        """Send a command; its id, or None when the engine is gone (the caller reports it)."""

    def close(self) -> None: ...


@dataclass
class PendingCommand:
    """A command sent and not yet answered: where the console shows its progress, and when it was sent."""

    id: str
    name: str  # change, undo, preview, pause, stop, ...
    sent: float = field(default_factory=time.perf_counter)
    rows: list[Any] = field(default_factory=list)  # the unit tree rows it changes
    section: str | None = None  # the controls section it came from
    received: bool = False  # the engine has it and applies it at its next step boundary


class CommandTracker:
    """Every command the engine has not answered yet, by id."""

    def __init__(self) -> None:
        self.in_flight: dict[str, PendingCommand] = {}

    def sent(self, cid: str, name: str, rows: list[Any] | None = None, section: str | None = None) -> PendingCommand:
        command = PendingCommand(cid, name, rows=list(rows or []), section=section)
        self.in_flight[cid] = command
        return command

    def received(self, cid: object) -> PendingCommand | None:
        """The engine has command ``cid``: the command, the first time only (None for unknown ids and repeats)."""
        command = self.in_flight.get(str(cid))
        if command is None or command.received:
            return None
        command.received = True
        return command

    def answered(self, cid: object) -> PendingCommand | None:
        """The engine's answer (ack or preview) to ``cid`` resolves it: the command, now no longer in flight."""
        return self.in_flight.pop(str(cid), None)


class NotSent(Exception):
    """No engine took the command; the message says why."""


class AnswerView(Protocol):
    """Who shows the engine's answers to the commands sent (the run screen)."""

    def command_received(self, command: PendingCommand) -> None: ...

    def command_acknowledged(self, command: PendingCommand, ack: dict[str, Any]) -> None: ...

    def command_previewed(self, command: PendingCommand, preview: PreviewEvent) -> None: ...

    def checkpoint_written(self, step: int) -> None: ...


@dataclass
class Arrivals:
    """What one drain of the link brought, already taken into the run model."""

    answers: list[dict[str, Any]] = field(default_factory=list)  # acks, received marks, hellos, previews
    checkpoints: list[int] = field(default_factory=list)  # the steps of the checkpoints written
    failed: str | None = None  # why the engine failed, when it went into its error state


class EngineSession:
    """The link to one run's engine (None: the run is shown from its history alone), the commands on their way,
    and the run model the events go into."""

    def __init__(self, model: RunModel, link: Link | None, history: list[dict[str, Any]]) -> None:
        self.model = model
        self.link = link
        self.commands = CommandTracker()
        self.history_t = max((t for ev in history if isinstance(t := ev.get("t"), (int, float))), default=0.0)
        self.clock = time.monotonic  # the clock of ``heard`` (tests turn it)
        self.heard: float | None = None  # monotonic time the engine last said anything (None: not connected yet)
        self.heard_step: int | None = None  # the run's step then (None: nothing heard since attaching)

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.connected

    @property
    def live(self) -> bool:
        """An engine is connected and its run has not ended."""
        return self.connected and self.model.state not in ENDED

    def connect(self, target: Wakeable) -> None:
        """Blocking (run it in a worker thread): ConnectionError when the engine cannot be reached."""
        assert self.link is not None, "a run shown from its history has no engine to connect to"
        self.link.connect(target)
        self.heard = self.clock()  # silence counts from the attach

    def close(self) -> None:
        if self.link is not None:
            self.link.close()

    def seen_in_history(self, ev: dict[str, Any]) -> bool:
        """A live event already drawn from events.jsonl (a hello is a fresh snapshot, never one of those)."""
        t = ev.get("t")
        return ev.get("type") != "hello" and isinstance(t, (int, float)) and t <= self.history_t

    # -- events in

    def take_events(self) -> Arrivals:
        """Everything the link received since the last call, taken into the run model."""
        arrivals = Arrivals()
        events = self.link.drain() if self.link is not None else []
        for ev in events:
            if not isinstance(ev, dict) or ev.get("type") == "heartbeat" or self.seen_in_history(ev):
                continue
            self.model.apply(ev)
            kind = ev.get("type")
            if kind in ANSWERS:
                arrivals.answers.append(ev)
            elif kind == "checkpoint" and isinstance(written := read_event(ev), CheckpointEvent):
                arrivals.checkpoints.append(written.step)
            elif kind == "state" and ev.get("state") == "error":
                arrivals.failed = ev.get("message") or "the engine failed"
        if events:
            self.heard, self.heard_step = self.clock(), self.model.step
        return arrivals

    def silence(self) -> str:
        """What to say of a live engine that said nothing for ``SILENT_AFTER_S`` (heartbeats included), else ''."""
        if self.heard is None or not self.live:
            return ""
        quiet = self.clock() - self.heard
        if quiet < SILENT_AFTER_S:
            return ""
        last = "nothing heard since attaching" if self.heard_step is None else f"last heard at step {self.heard_step}"
        return f"engine silent for {quiet:.0f} s — {last}"

    def route(self, arrivals: Arrivals, view: AnswerView) -> None:
        """Hand each answer to ``view`` once, with the command it answers (answers to no command of ours are
        dropped), then the checkpoints written."""
        for ev in arrivals.answers:
            kind = ev.get("type")
            if kind == "received":
                if (command := self.commands.received(ev.get("id"))) is not None:
                    view.command_received(command)
            elif kind == "ack":
                if (command := self.commands.answered(ev.get("id"))) is not None:
                    view.command_acknowledged(command, ev)
            elif kind == "preview":
                command = self.commands.answered(ev.get("id"))
                preview = read_event(ev)
                if command is not None and isinstance(preview, PreviewEvent):
                    view.command_previewed(command, preview)
        for step in arrivals.checkpoints:
            view.checkpoint_written(step)

    # -- commands out

    def send(
        self, cmd: str, rows: list[Any] | None = None, section: str | None = None, **fields: Any
    ) -> PendingCommand:
        """Send ``cmd`` and follow it until the engine answers; NotSent when no engine takes it."""
        if self.link is None or not self.link.connected:
            raise NotSent("no engine connected")
        cid = self.link.send(cmd, **fields)
        if cid is None:
            raise NotSent("the engine socket is closed")
        return self.commands.sent(cid, cmd, rows=rows, section=section)

    def preview(self, change: Change, section: str) -> PendingCommand | None:
        """Ask the engine what ``change`` would do; None when no engine takes it (a what-if is only a hint)."""
        try:
            return self.send("preview", section=section, change=wire(change))
        except NotSent:
            return None


def wire(change: Change) -> dict[str, Any]:
    """A change as the protocol carries it: only what it sets."""
    return change.model_dump(mode="json", exclude_defaults=True)


def unreachable(reason: str, engine: subprocess.Popen | None, run_dir: Path) -> str:
    """Why the engine cannot be reached: ``reason``, the exit code of the engine this console started, the end of
    engine.log."""
    said = f"cannot reach the engine: {reason}"
    if engine is not None and engine.poll() is not None:
        said += f" | the engine exited with code {engine.returncode}"
    log = run_dir / ENGINE_LOG
    if log.exists():
        said += " | engine.log: " + " / ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    return said
