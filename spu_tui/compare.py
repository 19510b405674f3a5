"""Other runs drawn beside the console's own: read from their ``events.jsonl``, never written, never locked.

A compared run is read with ``runs.read_history``'s rules (a line cut short is
skipped, a ``resumed`` event drops what the killed engine logged past its
checkpoint) and followed as it grows: ``new_events`` reads only the bytes added
since its last call (it keeps the file offset; a stat decides whether there is
anything to read), so a live run costs a stat every few seconds.  The reading
happens in a worker thread and ``add`` takes the events into the run's series
in the UI thread, so a frame never draws a series while it grows.  Textual-free.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from spu_engine.core.run_metrics import RunMetrics
from spu_engine.core.runs import EVENTS

COLORS = (
    "cyan",
    "orange",
    "magenta",
    "green",
    "red",
    "blue",
    "yellow",
    "white",
)  # run i's colour; the console's own run is 0


class ComparedRun:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir)
        self.metrics = RunMetrics(self.path.name)
        self._offset = 0
        self._restarted = False

    @property
    def name(self) -> str:
        return self.path.name

    def new_events(self) -> list[dict]:
        """The events appended since the last call, complete lines only (a worker thread reads them; ``add`` takes them)."""
        try:
            size = os.stat(self.path / EVENTS).st_size
        except OSError:
            return []
        if size < self._offset:  # the folder was started again (--overwrite): read it afresh
            self._offset = 0
            self._restarted = True
        if size == self._offset:
            return []
        with open(self.path / EVENTS, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(size - self._offset)
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
        self._offset += end
        events = []
        for line in chunk[:end].splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:  # cut short by a crash
                continue
        return events

    def add(self, events: list[dict]) -> bool:
        """Take events read by ``new_events`` (UI thread); True when something plotted changed."""
        changed = self._restarted
        if self._restarted:
            self.metrics, self._restarted = RunMetrics(self.path.name), False
        for ev in events:
            changed |= self.metrics.add(ev)
        return changed
