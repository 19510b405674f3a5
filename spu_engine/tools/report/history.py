"""The reading side of ``spu report``: a run folder's events, read back from ``events.jsonl``.

The events come through ``runs.read_history``, so a resumed run counts each step once.  The whole history is held
in memory today; reading it as a stream belongs here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spu_engine.core.runs import EVENTS, read_history


class ReportError(ValueError):
    """The run cannot be reported on; the text says why."""


def read_run_events(run_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The run's events and a note on lines that could not be read; ReportError for a folder that is no run."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder")
    if not (run_dir / EVENTS).is_file():
        raise ReportError(f"{run_dir} is not a run folder (no {EVENTS})")
    damaged: list[int] = []
    history = read_history(run_dir, damaged)
    notes = []
    if damaged:
        shown = ", ".join(map(str, damaged[:5])) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        notes.append(
            f"{EVENTS}: line{'s' if len(damaged) > 1 else ''} {shown} not readable "
            "(cut short by a crash or a full disk?); skipped"
        )
    return history, notes
