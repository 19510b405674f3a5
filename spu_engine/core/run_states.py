"""What a run is doing, as its ``state`` events say it: one enum for the engine, the run folder and the console."""

from __future__ import annotations

from enum import Enum


class RunState(str, Enum):
    LOADING = "loading"
    TRAINING = "training"
    PAUSED = "paused"
    STOPPED = "stopped"
    FINISHED = "finished"
    ERROR = "error"


ENDED = frozenset({RunState.FINISHED, RunState.STOPPED, RunState.ERROR})  # no step, sample or answer will come
