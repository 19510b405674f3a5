"""``events.jsonl``: every event in order, even across a full disk.

Lines go to an in-memory backlog first and are written from its head; a write
that fails (``WriteError``) leaves them there for the next try, so the file
never loses its order or gets half a line glued to the next.  The backlog is
bounded: past ``max_bytes`` its oldest lines go, counted, and the count is
said in the error the next failed write raises.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

from spu_engine.core.writes import writing

MAX_UNWRITTEN_BYTES = 16 << 20  # events kept in memory while events.jsonl cannot be written (the run is paused)


class EventLog:
    """Append-only ``events.jsonl`` with a bounded backlog of lines not yet written."""

    def __init__(self, path: Path, max_bytes: int = MAX_UNWRITTEN_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.file = open(path, "ab", buffering=0)  # noqa: SIM115 - open for the run; close() closes it
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self._dropped = 0  # oldest unwritten lines dropped to bound memory since the last good write
        self._torn = False  # a write stopped mid-line: the next one starts a new line

    @property
    def unwritten(self) -> int:
        return len(self._backlog)

    def add(self, line: bytes) -> None:
        """Queue one line (written by the next ``flush``)."""
        self._backlog.append(line)
        self._backlog_bytes += len(line)
        while self._backlog_bytes > self.max_bytes and len(self._backlog) > 1:
            self._backlog_bytes -= len(self._backlog.popleft())
            self._dropped += 1

    def flush(self) -> None:
        """Write the backlog in order; raises ``WriteError`` (saying what was dropped) and keeps the rest."""
        try:
            with writing(f"writing {self.path.name}", self.path.parent):
                if self._torn:
                    self._write_all(b"\n")
                while self._backlog:
                    self._write_all(self._backlog[0])
                    self._backlog_bytes -= len(self._backlog.popleft())
        except OSError as exc:
            if self._dropped:
                exc.args = (f"{exc} ({self._dropped} oldest unwritten events dropped to bound memory)",)
            raise
        self._dropped = 0

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.file.write(view)
            n = len(view) if n is None else n
            if n <= 0:
                raise OSError(f"{self.path.name} took no bytes of a {len(view)}-byte write")
            if n < len(view):
                self._torn = True  # the rest may not follow: a retry must not glue its line onto this half
            view = view[n:]
        self._torn = False

    def close(self) -> int:
        """Write what is left, close; returns how many lines could not be written."""
        try:
            self.flush()
        except OSError:
            pass
        self.file.close()
        return self.unwritten
