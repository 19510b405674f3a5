"""Where a run is and what moves it: pause, resume, stop, and waiting for writes, all at step boundaries.

A run is in one ``RunState`` (as ``state`` events say it); a stop, once asked
for, is a ``Stop``.  ``RunControl`` is the engine's boundary, a component whose
constructor names what it acts on: due timeline entries, then the commands that
arrived, then signals; while paused it waits for commands there, and retries
failed writes every ``write_retry_s``.  A write that fails pauses the run with
everything in memory (a multi-process run stops every rank instead: the others
cannot wait in step).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from spu_engine.core.policy import PolicyError, TimelineEntry
from spu_engine.core.run_states import RunState
from spu_engine.core.runs import CHECKPOINTS, EVENTS
from spu_engine.core.writes import WriteError
from spu_engine.loop.faults import UnwrittenState
from spu_engine.runtime.policy_runtime import Reporter, TimelineRefused
from spu_engine.storage import checkpoint as ckpt


@dataclass
class Stop:
    """A stop that was asked for; the loop ends at the next boundary."""

    reason: str | None = None  # None: a plain stop command
    fault: bool = False  # stopped by a fault (non-finite loss, a timeline entry that cannot apply...): exit code 1
    owes_checkpoint: bool = False  # the run first waits, paused, until its checkpoint is written


class CommandRefused(Exception):
    """A command the engine will not carry out now; the text says why."""


class Inbox(Protocol):
    """The commands that arrive between two boundaries (``commands.Commands``)."""

    def take(self, block: bool, stop_signal: str | None) -> tuple[list[Any], str | None]: ...
    def handle(self, cmd: Any) -> None: ...
    def submit(self, cmd: Any) -> None: ...


class RunControl:
    """The engine's run state machine: pause, resume, stop, the boundary and the retries of failed writes."""

    write_retry_s = 30.0  # a write of run state that failed is tried again this often while the run waits

    def __init__(
        self,
        reporter: Reporter,
        clock: Callable[[], int],
        inbox: Inbox,
        unwritten: UnwrittenState,
        *,
        apply_due: Callable[[int], None],
        save_checkpoint: Callable[[], Path | None],
        dist: Any,
        run_dir: Path | None,
    ) -> None:
        self.reporter, self.clock, self.inbox, self.unwritten = reporter, clock, inbox, unwritten
        self.apply_due = apply_due  # the timeline entries due at a step (``PolicyRuntime.apply_due``)
        self.save_checkpoint = save_checkpoint
        self.dist, self.run_dir = dist, run_dir
        self.state = RunState.LOADING
        self.stop: Stop | None = None
        self.stop_signal: str | None = None  # set by a signal handler; acted on at the next boundary
        self._write_pause = False  # paused because run state could not be written: resume means retry
        self._retry_at = 0.0
        self.saved_path: Path | None = None  # the checkpoint the last write through this control made

    @property
    def step(self) -> int:
        return self.clock()

    def emit(self, type_: str, **fields: Any) -> Any:
        return self.reporter.emit(type_, **fields)

    def log(self, message: str, level: str = "info") -> None:
        self.reporter.log(message, level)

    def set_state(self, state: RunState, message: str = "") -> None:
        self.state = state
        self.emit("state", state=state.value, step=self.step, message=message)

    def submit(self, command: Any) -> None:
        """Thread-safe: queue a parsed command for the next step boundary."""
        self.inbox.submit(command)

    def _take_commands(self, block: bool) -> list[Any]:
        cmds, signal_name = self.inbox.take(block, self.stop_signal)
        self.stop_signal = self.stop_signal or signal_name
        return cmds

    def pause(self, message: str = "") -> None:
        if self.state is not RunState.PAUSED:
            self.set_state(RunState.PAUSED, message)

    def resume(self) -> None:
        if self._write_pause:  # paused by a failed write: resume means try it again
            if not self._retry_writes():
                raise CommandRefused("still cannot write: " + self.unwritten.summary())
        elif self.state is RunState.PAUSED:
            self.set_state(RunState.TRAINING)

    def request_stop_now(self) -> None:
        """A plain stop (the command): the run ends at this boundary."""
        self.stop = self.stop or Stop()

    def write_checkpoint_now(self) -> bool:
        """Write a checkpoint now, retrying every other write that failed (`s`); True when everything is written."""
        self.unwritten.write("checkpoint", self._checkpoint)
        return self._retry_writes()

    def checkpoint_now(self) -> str:
        if not self.write_checkpoint_now():
            raise WriteError(self.unwritten.summary())
        return str(self.saved_path)

    def save_or_pause(self) -> None:
        """A checkpoint that cannot be written (disk full) pauses the run instead of ending it, state in memory,
        until a retry writes it (automatic, `s` or resume) or the run is stopped."""
        if not self.unwritten.write("checkpoint", self._checkpoint) and self.dist is None:
            self.boundary()

    def _checkpoint(self) -> None:
        self.saved_path = self.save_checkpoint()

    # ------------------------------------------------------------------ boundary

    def boundary(self) -> None:
        """Everything that may change the run happens here, between two optimizer steps."""
        if self.stop is None:
            try:
                self.apply_due(self.step)
            except TimelineRefused as exc:  # validated at load, so the model refused it now: stop rather than diverge
                self.timeline_failed(exc.entry, exc)
        for cmd in self._take_commands(block=False):
            self.inbox.handle(cmd)
        self._stop_if_signalled()
        if self.unwritten and not self._stopping():
            self._pause_for_writes()
        while self.state is RunState.PAUSED and not self._stopping():
            for cmd in self._take_commands(block=True):
                self.inbox.handle(cmd)
            self._stop_if_signalled()
            if self._write_pause and time.monotonic() >= self._retry_at and not self._retry_writes():
                self.emit(
                    "error",
                    step=self.step,
                    message=self.unwritten.pause_message(self.step, self.write_retry_s),
                    kind="write",
                )

    def _stopping(self) -> bool:
        """A stop is due now: asked for, and owing no checkpoint that still waits to be written."""
        return self.stop is not None and not (self.stop.owes_checkpoint and self.unwritten)

    def timeline_failed(self, entry: TimelineEntry, exc: PolicyError) -> None:
        """A timeline entry the engine cannot apply at its step: a replay that skipped it would silently diverge,
        so the run stops (exit 1) after a checkpoint that keeps the entry pending."""
        what = f"timeline entry at {entry.moment()}" if entry.step is not None else f"trigger {entry.moment()}"
        self.fault(f"{what} cannot be applied: {exc}; stopping rather than diverge from the policy", "timeline")

    def fault(self, message: str, kind: str) -> None:
        """A fault the run must not train past: said, then the run stops (exit 1) after a checkpoint."""
        self.emit("error", step=self.step, message=message, kind=kind)
        self.stop = Stop(message, fault=True, owes_checkpoint=True)
        self.save_or_pause()

    def request_stop(self, reason: str = "stop requested") -> None:
        """Safe in a signal handler (sets one attribute, takes no lock): checkpoint and stop at the next boundary."""
        self.stop_signal = reason

    def _stop_if_signalled(self) -> None:
        if not self.stop_signal or self._stopping():
            return
        self.log(f"{self.stop_signal}: writing a checkpoint, then stopping", "warning")
        fault = self.stop is not None and self.stop.fault  # a fault stop still waiting for its checkpoint stays one
        self.stop = Stop(f"{self.stop_signal}: stopped at step {self.step} after a checkpoint", fault=fault)
        if (
            not self.write_checkpoint_now()
        ):  # a signal still ends the run, cleanly, saying what was not written (exit 1)
            missing = self.unwritten.summary()
            if "checkpoint" in self.unwritten:
                newest = (
                    ckpt.latest_checkpoint(self.run_dir / CHECKPOINTS, log=lambda _m: None) if self.run_dir else None
                )
                self.stop.reason = (
                    f"{self.stop_signal}: stopped at step {self.step} without a checkpoint ({missing}); "
                    f"the newest complete checkpoint is {newest.name if newest else 'none'}"
                )
            else:
                self.stop.reason = (
                    f"{self.stop_signal}: stopped at step {self.step} after a checkpoint; not written: {missing}"
                )
            self.stop.fault = True

    # ------------------------------------------------------------------ faults

    def _retry_writes(self) -> bool:
        """Try every write that failed again; True when none is left.

        Called by `s`, resume, and every ``write_retry_s`` while the run waits (a headless run with nobody there).
        """
        self._retry_at = time.monotonic() + self.write_retry_s
        if not self.unwritten.retry(first=EVENTS):
            return False
        if self._write_pause:
            self._write_pause = False
            self.log("the writes that failed went through; nothing was lost")
            if self.stop is None:
                self.set_state(RunState.TRAINING, f"resumed at step {self.step}")
        return True

    def _pause_for_writes(self) -> None:
        if self._write_pause:
            return
        if (
            self.dist is not None
        ):  # other ranks cannot wait in step with rank 0's retries: every rank stops at the next boundary
            if not self.stop_signal:
                self.emit(
                    "error", step=self.step, message=self.unwritten.summary() + "; stopping every rank", kind="write"
                )
            self.stop_signal = self.stop_signal or "write failure"
            return
        message = self.unwritten.pause_message(self.step, self.write_retry_s)
        self._write_pause = True
        self._retry_at = time.monotonic() + self.write_retry_s
        self.emit("error", step=self.step, message=message, kind="write")
        self.set_state(RunState.PAUSED, message)
