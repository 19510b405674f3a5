"""The commands a client sends, carried out at a step boundary and answered with an ``ack``.

One handler per command type, found in one table; a handler returns the ack's
message or raises: ``PolicyError`` and ``CommandRefused`` are refusals said as
they are, an ``OSError`` (a write that failed) is said with the command's name.
Read-only commands (``hello``, ``preview``) never get here: the socket thread
answers them.  A checkpoint of a step already written, with nothing changed
since, is the same checkpoint: answered with its path, not written again; what
does cost time (a checkpoint, an evaluation) has its own rate
(``command_rate``).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from spu_engine.core.policy import Change, Policy, PolicyError, TimelineEntry
from spu_engine.core.protocol.commands import (
    ChangeCmd,
    CheckpointCmd,
    EvaluateCmd,
    ExportCmd,
    HelloCmd,
    PauseCmd,
    ResumeCmd,
    ScheduleCmd,
    SetPolicyCmd,
    StopCmd,
    UndoCmd,
    UnscheduleCmd,
)
from spu_engine.core.run_guard import policy_file_problem
from spu_engine.core.writes import WriteError, atomic_write_text, write_new_text
from spu_engine.loop.command_rate import (
    CHECKPOINT_BURST,
    CHECKPOINT_EVERY_S,
    EVALUATE_BURST,
    EVALUATE_EVERY_S,
    CommandRate,
)
from spu_engine.loop.faults import is_out_of_memory
from spu_engine.loop.lifecycle import CommandRefused

KEEP_CHECKPOINT = (CheckpointCmd, PauseCmd, ResumeCmd, ExportCmd)  # commands after which a checkpoint is still current
KEEP_EVALUATION = (*KEEP_CHECKPOINT, EvaluateCmd)  # and after which an evaluation at this step still holds


class CommandHost(Protocol):
    """What the commands act on: the engine."""

    step: int
    dist: Any
    unwritten: Any
    system: Any  # the SystemSampler, told at each boundary whether to sample after the next step
    saved: tuple[int, Path] | None  # the step and folder of the last checkpoint written, None once anything changed

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]: ...
    def apply_change(self, change: Change, source: str) -> None: ...
    def undo(self) -> str: ...
    def add_scheduled(self, entry: TimelineEntry) -> str: ...
    def remove_scheduled(self, entry: TimelineEntry) -> str: ...
    def pause(self, message: str = "") -> None: ...
    def resume(self) -> None: ...
    def request_stop_now(self) -> None: ...
    def write_checkpoint_now(self) -> bool: ...
    def checkpoint_now(self) -> str: ...
    def survive_oom(self, fn: Callable[[], Any], what: str) -> Any: ...
    def change_out_of_memory(self, name: str, change: Change | None, detail: str) -> str: ...
    def evaluate(self) -> dict[str, float]: ...
    def replayable_policy(self) -> Policy: ...


class Commands:
    """The engine's inbox and command table."""

    def __init__(self, engine: CommandHost) -> None:
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()  # filled from any thread, emptied at step boundaries
        self.table: dict[type, Callable[[Any], str | None]] = {
            ChangeCmd: lambda cmd: engine.apply_change(cmd.change, source="client"),
            UndoCmd: lambda cmd: engine.undo(),
            ScheduleCmd: lambda cmd: engine.add_scheduled(cmd.entry),
            UnscheduleCmd: lambda cmd: engine.remove_scheduled(cmd.entry),
            SetPolicyCmd: self.set_policy,
            PauseCmd: lambda cmd: engine.pause(),
            ResumeCmd: lambda cmd: engine.resume(),
            StopCmd: self.stop,
            CheckpointCmd: self.checkpoint,
            EvaluateCmd: self.evaluate,
            ExportCmd: self.export,
        }
        self.now = 0.0  # the boundary's time, rank 0's: the clock of the costly commands' rates
        self.checkpoints = CommandRate("checkpoint", CHECKPOINT_BURST, CHECKPOINT_EVERY_S)
        self.evaluations = CommandRate("evaluate", EVALUATE_BURST, EVALUATE_EVERY_S)
        self.evaluated: int | None = None  # the step an evaluate command scored, None once anything changed

    def submit(self, cmd: Any) -> None:
        """Thread-safe: queue a parsed command for the next step boundary."""
        self.inbox.put(cmd)

    def _drain(self, block: bool) -> list[Any]:
        cmds = []
        try:
            cmds.append(self.inbox.get(timeout=0.25) if block else self.inbox.get_nowait())
            while True:
                cmds.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return cmds

    def take(self, block: bool, stop_signal: str | None) -> tuple[list[Any], str | None]:
        """This boundary's commands and stop signal: rank 0's, broadcast so every rank applies the same ones; with
        them rank 0's word on the system sample and a timed checkpoint, so every rank gathers its readings and writes its
        checkpoint after the same step."""
        dist, system = self.engine.dist, getattr(self.engine, "system", None)
        cadence = getattr(self.engine, "cadence", None)
        if dist is None:
            cmds, self.now = self._drain(block), time.monotonic()
            return cmds, stop_signal
        due = system is not None and system.proposal()
        save = cadence is not None and cadence.proposal()
        mine = (self._drain(block), time.monotonic()) if dist.is_main else ([], 0.0)
        (cmds, self.now), signal, due, save = dist.broadcast((mine, stop_signal, due, save))
        if system is not None:
            system.agree(due)
        if cadence is not None:
            cadence.agree(save)
        return cmds, signal

    def handle(self, cmd: Any) -> None:
        """Carry out one command and answer it with an ``ack`` (and an ``error`` when refused)."""
        if isinstance(cmd, HelloCmd):  # read-only (the socket server answers it): nothing to apply, ack or log
            return
        name, out_of_memory = getattr(cmd, "cmd", "?"), None
        try:
            ok, message = True, self.table[type(cmd)](cmd) or ""
        except (PolicyError, CommandRefused) as exc:
            ok, message = False, str(exc)
        except OSError as exc:
            ok, message = False, f"{name}: {exc}"
        except RuntimeError as exc:  # a change too big for the device: refused, and the run goes on
            if not is_out_of_memory(exc):
                raise
            out_of_memory = str(exc).strip().split("\n")[0][:300]
        if out_of_memory is not None:  # outside the except block: the failed attempt's tensors are unreachable
            ok, message = False, self.engine.change_out_of_memory(name, getattr(cmd, "change", None), out_of_memory)
        if not isinstance(cmd, KEEP_CHECKPOINT):  # what a checkpoint holds may have changed: the next one writes
            self.engine.saved = None
        if not isinstance(cmd, KEEP_EVALUATION):  # the model may have changed: the next evaluation runs
            self.evaluated = None
        self.engine.emit("ack", id=getattr(cmd, "id", None), cmd=name, step=self.engine.step, ok=ok, message=message)
        if not ok:
            self.engine.emit("error", id=getattr(cmd, "id", None), step=self.engine.step, message=message)

    def checkpoint(self, cmd: CheckpointCmd) -> str:
        """A checkpoint now, or the one already written at this step when nothing changed since (and no write waits
        for a retry, which a checkpoint command also is)."""
        saved = self.engine.saved
        current = saved is not None and saved[0] == self.engine.step
        if current and self.engine.dist is None:  # what one process alone knows (ranks must all decide alike)
            current = not self.engine.unwritten and saved[1].is_dir()
        if current:
            return f"the same checkpoint: step {saved[0]} is written and nothing changed since: {saved[1]}"
        self.checkpoints.take(self.now)
        return self.engine.checkpoint_now()

    def evaluate(self, cmd: EvaluateCmd) -> str:
        """An evaluation now, or word of the one an evaluate command ran at this step when nothing changed since
        (the same model on the same data scores the same)."""
        if self.evaluated == self.engine.step:
            return f"the same evaluation: step {self.engine.step} is evaluated and nothing changed since"
        self.evaluations.take(self.now)
        self.engine.survive_oom(self.engine.evaluate, "evaluation")
        self.evaluated = self.engine.step
        return ""

    def set_policy(self, cmd: SetPolicyCmd) -> None:
        """A whole policy from a client: its sections become one change (its timeline is not the run's)."""
        data = cmd.policy.sections().model_dump(mode="json", exclude_none=True)
        data.pop("spu_policy", None)
        data.pop("timeline", None)
        self.engine.apply_change(Change(set=data), source="client")

    def stop(self, cmd: StopCmd) -> None:
        if cmd.checkpoint and not self.engine.write_checkpoint_now():  # no stop: the run waits paused for space
            raise WriteError(
                "stop refused, the checkpoint could not be written: " + self.engine.unwritten.why["checkpoint"]
            )
        self.engine.request_stop_now()

    def export(self, cmd: ExportCmd) -> str:
        path = Path(cmd.path).expanduser()
        if self.engine.dist is None or self.engine.dist.is_main:
            self._export_to(path, cmd.overwrite)
        return str(path)

    def _export_to(self, path: Path, overwrite: bool) -> None:
        """The replayable policy to a file the user named: a new file, or an existing one only when the console
        confirmed (``overwrite``), keeping that file's mode."""
        text = self.engine.replayable_policy().to_yaml()
        if path.is_dir():
            raise PolicyError(f"export: {path} is a folder; give a file name")
        problem = policy_file_problem(path)  # a run's own file, or a checkpoint's: never written, whatever the flags
        if problem is not None:
            raise PolicyError(f"export: {problem}")
        if not path.exists():
            try:
                write_new_text(path, text)
                return
            except FileExistsError:
                pass  # created meanwhile: treated as the existing file it now is
        if not overwrite:
            raise PolicyError(
                f"export: {path} exists; it is replaced only when you confirm (overwrite: true), or choose a new name"
            )
        atomic_write_text(path, text, keep_mode_of=path)
