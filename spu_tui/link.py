"""The console's end of the engine socket.

The client's reader thread must never wait for the UI, and the UI must never
run one handler per event when the engine emits hundreds a second.  So the
reader thread only appends to a deque and posts one ``EventsArrived`` wake-up
message when none is outstanding (``post_message`` is non-blocking); the UI
drains everything that has piled up in one go.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import Any

from textual.message import Message
from textual.message_pump import MessagePump

from spu_engine.runs import SOCKET
from spu_engine.transport import EngineClient


class EventsArrived(Message):
    """Engine events are waiting in ``EngineLink.drain()``."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EventsArrived)


class EngineLink:
    def __init__(self, target: MessagePump, run_dir: Path) -> None:
        self.target = target
        self.run_dir = run_dir
        self.client = EngineClient(run_dir / SOCKET, on_event=self._on_event)
        self._inbox: deque[dict[str, Any]] = deque()
        self._wake_pending = False
        self._lock = threading.Lock()

    def connect(self, timeout: float = 60.0) -> None:
        """Blocking (run it in a worker thread): retries while the engine starts."""
        self.client.connect(timeout=timeout)

    @property
    def connected(self) -> bool:
        return self.client.connected

    def _on_event(self, ev: dict[str, Any]) -> None:  # reader thread
        self._inbox.append(ev)
        with self._lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        self.target.post_message(EventsArrived())

    def drain(self) -> list[dict[str, Any]]:
        """Everything received since the last drain (UI thread)."""
        with self._lock:
            self._wake_pending = False
        out = []
        while self._inbox:
            out.append(self._inbox.popleft())
        return out

    def send(self, cmd: str, **fields: Any) -> str | None:
        """Send a command; None when the engine is gone (the caller reports it)."""
        try:
            return self.client.send(cmd, **fields)
        except OSError:
            return None

    def close(self) -> None:
        self.client.close()
