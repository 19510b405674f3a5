"""The reading side of ``spu report``: a run folder's events, read back from ``events.jsonl``.

The events come through ``runs.iter_history``, so a resumed run counts each step once, and as a stream: a report
holds what it keeps (its series, its rounds), not the file, however long the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spu_engine.core.runs import EVENTS, iter_history


class ReportError(ValueError):
    """The run cannot be reported on; the text says why."""


class RunEvents:
    """A run's events, read from the file each time they are iterated; ``notes`` says (after a pass) which lines
    could not be read."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.damaged: list[int] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.damaged = []
        yield from iter_history(self.run_dir, self.damaged)

    @property
    def notes(self) -> list[str]:
        damaged = self.damaged
        if not damaged:
            return []
        shown = ", ".join(map(str, damaged[:5])) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        return [
            f"{EVENTS}: line{'s' if len(damaged) > 1 else ''} {shown} not readable "
            "(cut short by a crash or a full disk?); skipped"
        ]


def read_run_events(run_dir: Path) -> RunEvents:
    """The run's events (a stream); ReportError for a folder that is no run."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder")
    if not (run_dir / EVENTS).is_file():
        raise ReportError(f"{run_dir} is not a run folder (no {EVENTS})")
    return RunEvents(run_dir)
