"""When the engine checkpoints on its own: every ``checkpoint_every`` steps, or by default every
``checkpoint_minutes`` of training time, so a crash (a dropped SSH, a killed process) leaves a checkpoint to resume
from whatever the run's length.

Training time is the steps' own (``step_time``), not evaluations or pauses, so a paused run does not write the same
checkpoint again.  On many ranks every rank must write the same checkpoint at the same step: rank 0's clock decides,
its word broadcast with the boundary's commands (``Commands.take``), as the system sample's is.
"""

from __future__ import annotations

from spu_engine.core.config import RunSettings


class CheckpointCadence:
    def __init__(self, config: RunSettings) -> None:
        self.every = config.checkpoint_every
        self.seconds = (
            None if self.every is not None or not config.checkpoint_minutes else 60 * config.checkpoint_minutes
        )
        self.trained = 0.0  # training seconds since the last timed checkpoint
        self.agreed: bool | None = None  # rank 0's word at the last boundary (many ranks); None: decide alone

    def describe(self) -> str:
        """The cadence in words, for the start of the run's log."""
        if self.every:
            return f"checkpoints every {self.every} steps"
        if self.seconds is not None:
            return f"checkpoints every {self.seconds / 60:g} minutes of training (checkpoint_minutes)"
        what = "checkpoint_every 0" if self.every == 0 else "checkpoint_minutes 0"
        return f"{what}: no checkpoint until the end (or one asked for): a crash loses the run"

    def stepped(self, step_time: float) -> None:
        self.trained += step_time

    def proposal(self) -> bool:
        """This rank's clock says a timed checkpoint is due."""
        return self.seconds is not None and self.trained >= self.seconds

    def agree(self, due: bool) -> None:
        self.agreed = due

    def due(self, step: int) -> bool:
        """Checkpoint after step ``step`` (steps taken)?  A timed one starts the clock again."""
        if self.every:
            return step % self.every == 0
        due = self.proposal() if self.agreed is None else self.agreed
        if due:
            self.trained, self.agreed = 0.0, (None if self.agreed is None else False)
        return due
