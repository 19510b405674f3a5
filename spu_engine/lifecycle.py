"""Where a run is: one state, as ``state`` events say it, and the stop it may be heading for."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class RunState(str, Enum):
    """What the run is doing, as ``state`` events say it."""

    LOADING = "loading"
    TRAINING = "training"
    PAUSED = "paused"
    STOPPED = "stopped"
    FINISHED = "finished"
    ERROR = "error"


@dataclass
class Stop:
    """A stop that was asked for; the loop ends at the next boundary."""

    reason: str | None = None  # None: a plain stop command
    fault: bool = False  # stopped by a fault (non-finite loss, a timeline entry that cannot apply...): exit code 1
    owes_checkpoint: bool = False  # the run first waits, paused, until its checkpoint is written
