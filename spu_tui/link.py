"""The console's end of the engine socket.

The client's reader thread must never wait for the UI, and the UI must never
run one handler per event when the engine emits hundreds a second.  So the
reader thread only puts events in an ``Inbox``, which posts one
``EventsArrived`` wake-up message when none is outstanding (``post_message`` is
non-blocking); the UI drains everything that has piled up in one go.
``EngineLink`` is the session's ``Link`` over the engine's socket.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import Any

from textual.message import Message

from spu_engine.core.runs import SOCKET
from spu_engine.core.transport import EngineClient
from spu_tui.session import Link, Wakeable


class EventsArrived(Message):
    """Engine events are waiting in ``Link.drain()``."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EventsArrived)


class Inbox:
    """Events from another thread, with at most one wake-up message outstanding at ``target``."""

    def __init__(self, target: Wakeable) -> None:
        self.target = target
        self._events: deque[dict[str, Any]] = deque()
        self._wake_posted = False
        self._lock = threading.Lock()

    def put(self, event: dict[str, Any]) -> None:
        """Any thread: keep ``event``, and wake the target unless a wake-up is already on its way."""
        self._events.append(event)
        with self._lock:
            if self._wake_posted:
                return
            self._wake_posted = True
        self.target.post_message(EventsArrived())

    def drain(self) -> list[dict[str, Any]]:
        """The target's thread: every event put since the last drain; the next put wakes it again."""
        with self._lock:
            self._wake_posted = False
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out


class EngineLink(Link):
    """The socket of the engine serving ``run_dir``."""

    def __init__(self, run_dir: Path) -> None:
        self.client = EngineClient(Path(run_dir) / SOCKET, on_event=self._put)
        self.inbox: Inbox | None = None

    @property
    def connected(self) -> bool:
        return self.client.connected

    def connect(self, target: Wakeable, timeout: float = 60.0) -> None:
        """Retries while the engine starts."""
        self.inbox = Inbox(target)
        self.client.connect(timeout=timeout)

    def _put(self, event: dict[str, Any]) -> None:  # the client's reader thread, only after connect()
        assert self.inbox is not None
        self.inbox.put(event)

    def drain(self) -> list[dict[str, Any]]:
        return self.inbox.drain() if self.inbox is not None else []

    def send(self, cmd: str, **fields: Any) -> str | None:
        try:
            return self.client.send(cmd, **fields)
        except OSError:
            return None

    def close(self) -> None:
        self.client.close()
