"""Commands on their way to the engine, until it answers them.

A command is *sent* (the console wrote it), then *received* (the engine says it
has it; it applies at the next step boundary), then answered: an ack (``ok`` or
refused, with the reason) or, for a preview, the preview itself.  The console
shows each stage on the rows or the controls section the command came from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Command:
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
        self.in_flight: dict[str, Command] = {}

    def sent(self, cid: str, name: str, rows: list[Any] | None = None, section: str | None = None) -> Command:
        command = Command(cid, name, rows=list(rows or []), section=section)
        self.in_flight[cid] = command
        return command

    def received(self, cid: object) -> Command | None:
        """The engine has command ``cid``: the command, the first time only (None for unknown ids and repeats)."""
        command = self.in_flight.get(str(cid))
        if command is None or command.received:
            return None
        command.received = True
        return command

    def answered(self, cid: object) -> Command | None:
        """The engine's answer (ack or preview) to ``cid`` resolves it: the command, now no longer in flight."""
        return self.in_flight.pop(str(cid), None)
