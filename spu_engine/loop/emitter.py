"""Where the engine's events go: ``events.jsonl`` (through its backlog) and every sink (the socket, trackers).

One component, so the runtime, the trainer and the run control each get it as their ``runtime.Reporter`` instead
of reaching into the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spu_engine.core.protocol import encode, event
from spu_engine.core.runs import EVENTS
from spu_engine.loop.faults import UnwrittenState
from spu_engine.storage.event_log import EventLog

Sink = Callable[[bytes, dict], None]


class Emitter:
    """Each event encoded once, added to the event log and handed to every sink in order."""

    def __init__(
        self, sinks: list[Sink], event_log: EventLog | None, unwritten: UnwrittenState, clock: Callable[[], int]
    ) -> None:
        self.sinks = sinks  # the engine's list: a sink added later (trackers, a test's recorder) hears what follows
        self.event_log = event_log
        self.unwritten = unwritten
        self.clock = clock  # the step a log message is said at
        self.settle: Callable[[], None] = lambda: None  # sends a step event held for its values (step_readout)

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        self.settle()  # a held step goes first: events stay in the order things happened
        ev = event(type_, **fields)
        line = encode(ev)
        if self.event_log is not None:
            self.event_log.add(line)
            if EVENTS not in self.unwritten:  # while it fails, retries come from the paused loop, not every event
                self.unwritten.write(EVENTS, self.event_log.flush)
        for sink in self.sinks:
            sink(line, ev)
        return ev

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message, step=self.clock())
