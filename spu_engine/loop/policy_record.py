"""The engine's record of its policy: what it started from, every change applied since, what is still scheduled.

``replayable_policy`` (state at step 0 + the changes applied + the entries and triggers still to come) is what
``policy.yaml`` holds and an export writes, so a run replays from it.  The record hears of each change the runtime
takes (``RuntimeHooks.applied``) and of each change to the schedule (``RuntimeHooks.scheduled``), and it carries out
the console's scheduling commands and ``undo``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from spu_engine.core.config import EngineConfig
from spu_engine.core.machine import Machine, replay_note
from spu_engine.core.policy import Change, Policy, PolicyError, TimelineEntry, undo_change
from spu_engine.core.runs import POLICY, write_policy
from spu_engine.loop.faults import UnwrittenState
from spu_engine.loop.machine_here import machine_here
from spu_engine.runtime.policy_runtime import PolicyRuntime, Reporter, TimelineRefused
from spu_engine.runtime.selection import check_policy_against_model
from spu_engine.runtime.unit_stats import describe_units, trainable_by_unit
from spu_engine.tasks import Task


class PolicyRecord:
    """Initial policy, recorded changes and the undo stack of one engine run, kept in ``policy.yaml``."""

    def __init__(
        self,
        runtime: PolicyRuntime,
        policy: Policy,
        *,
        config: EngineConfig,
        task: Task,
        reporter: Reporter,
        clock: Callable[[], int],
        unwritten: UnwrittenState,
        run_dir: Path | None,
    ) -> None:
        self.runtime, self.config, self.task, self.reporter, self.clock = runtime, config, task, reporter, clock
        self.unwritten, self.run_dir = unwritten, run_dir
        self.initial_policy = policy.sections()
        self.recorded: list[TimelineEntry] = []
        self.undoable: list[Policy] = []  # the sections before each client change, newest last (``undo``)
        self._machine: Machine | None = None

    @property
    def step(self) -> int:
        return self.clock()

    @property
    def methods(self) -> list:
        return self.runtime.methods

    @property
    def pending(self) -> list[TimelineEntry]:
        return self.runtime.pending

    @property
    def triggers(self) -> list[TimelineEntry]:
        return self.runtime.triggers

    def emit(self, type_: str, **fields: Any) -> Any:
        return self.reporter.emit(type_, **fields)

    def log(self, message: str, level: str = "info") -> None:
        self.reporter.log(message, level)

    def check_triggers(self) -> None:
        """The runtime's triggers, as the policy brought them: each must watch a number this task's evaluation gives."""
        for trigger in self.triggers:
            self.check_trigger(trigger)
        if not self.config.eval_every and any(t.when is not None for t in self.triggers):
            self.log(
                "when-triggers are checked at the evaluations every eval_every steps; with eval_every 0 only the last one, "
                "after the last step, where a change acts on nothing",
                "warning",
            )

    def check_trigger(self, trigger: TimelineEntry) -> None:
        """A when-trigger must watch a number this task's evaluation gives."""
        fields = self.task.eval_fields
        if trigger.when is not None and trigger.when.metric not in fields:
            raise PolicyError(
                f"timeline: the trigger {trigger.moment()}: {trigger.when.metric!r} is not a field of the {self.task.name} task's "
                f"evaluation (it gives {', '.join(fields)})"
            )

    def replayable_policy(self) -> Policy:
        """Run settings + state at step 0 + every change applied so far + changes still scheduled + the triggers, each
        with the steps it fired at (its firings are among the changes applied, so a replay does not decide them again),
        and each method that decides by itself marked as decided up to its last decision (``Method.exported``)."""
        timeline = [*self.recorded, *self.pending, *self.triggers]
        initial = self.initial_policy
        for m in self.methods:
            initial = m.exported(initial)
        update = {"run": self.config.run_settings(), "machine": self.machine(), "timeline": timeline}
        return initial.model_copy(update=update)

    def machine(self) -> Machine:
        """Where this run trains, read once (exports record it)."""
        if self._machine is None:
            self._machine = machine_here(next(self.runtime.model.parameters()).device)
        return self._machine

    def check_machine(self, recorded: Machine | None) -> None:
        """A policy recorded on another machine (``machine:``) replays to float precision only: said at the start."""
        note = replay_note(recorded, self.machine())
        if note:
            self.reporter.log(note, "warning")

    def scheduled(self) -> list[dict[str, Any]]:
        """What is still to come, as the console lists it: the pending step entries and every trigger (fired ones too)."""
        return [
            e.model_dump(mode="json", exclude_none=True, exclude_defaults=True) for e in [*self.pending, *self.triggers]
        ]

    def schedule_changed(self) -> None:
        self.save_policy()
        self.emit("scheduled", step=self.step, scheduled=self.scheduled())

    def add_scheduled(self, entry: TimelineEntry) -> str:
        """A timeline entry or trigger from a console.  A when-trigger is checked from the next evaluation on (its
        ``after_step`` is now), so a replay of the export checks it from the same point."""
        rt = self.runtime
        if entry.step is not None and entry.step < self.step:
            raise PolicyError(
                f"add: step {entry.step} has passed (the run is at step {self.step}); make the change now instead"
            )
        began = rt.epoch_start(entry.at.epoch or 0) if entry.at is not None else None
        if began is not None and began < self.step:
            raise PolicyError(
                f"add: epoch {entry.at.epoch} began at step {began} (the run is at step {self.step}, "
                f"{rt.steps_per_epoch} steps an epoch); make the change now instead"
            )
        if entry.when is not None:
            entry = entry.model_copy(update={"after_step": max(entry.after_step, self.step), "fired": []})
            self.check_trigger(entry)
        rt.current.apply(entry)  # PolicyError naming the key, for a change that makes no valid policy
        as_policy = rt.current.model_copy(update={"timeline": [entry]})
        check_policy_against_model(as_policy, rt.model, rt.units, rt.names_under)
        if entry.is_trigger:
            rt.triggers.append(entry)
        else:
            rt.pending = sorted([*rt.pending, entry], key=lambda e: e.step or 0)
        try:
            rt.apply_due(self.step)  # an entry due now applies at this boundary, as it would in a replay
        except TimelineRefused:
            (rt.triggers if entry.is_trigger else rt.pending).remove(entry)
            raise
        finally:
            self.schedule_changed()
        return f"scheduled: {entry.moment()}"

    def remove_scheduled(self, entry: TimelineEntry) -> str:
        """Take a pending entry or a trigger out (matched by what it does and when; its firings so far stay recorded)."""
        key = entry.model_dump(exclude={"fired", "after_step"})
        for kept in (self.pending, self.triggers):
            for e in kept:
                if e.model_dump(exclude={"fired", "after_step"}) == key:
                    kept.remove(e)
                    self.schedule_changed()
                    return f"removed: {e.moment()}"
        raise PolicyError(
            f"remove: no scheduled {entry.moment()} with that change (it may have applied or been removed already)"
        )

    def changed(self, change: Change, source: str, before: Policy, names: list[str]) -> None:
        """A change the runtime took (``before``, ``names``: the sections and tensor names before it): recorded with
        its step, saved, and said in a ``policy`` event; one that changed nothing is neither recorded nor replayed."""
        rt = self.runtime
        if rt.current == before:  # e.g. a field set back to the value in force: nothing to record or replay
            return
        if source == "client":
            self.undoable.append(before)
        self.recorded.append(TimelineEntry(step=self.step, **change.model_dump()))
        self.save_policy()
        self.announce(change, source, names)

    def announce(self, change: Change, source: str, names: list[str]) -> None:
        """The ``policy`` event of a change now in force (``names``: the tensor names before it)."""
        rt = self.runtime
        self.emit(
            "policy",
            step=self.step,
            source=source,
            change=change.model_dump(mode="json", exclude_none=True),
            policy=rt.current.model_dump(mode="json", exclude_none=True),
            trainable=rt.trainable_count(),
            trainable_by_unit=trainable_by_unit(rt.units, rt.params),
            frozen_tensors=[n for n, p in rt.params.items() if not p.requires_grad],
            # a method added or removed tensors
            units=describe_units(rt.units, rt.params) if rt.param_names != names else None,
        )
        self.warn_if_nothing_trains()

    def warn_if_nothing_trains(self) -> None:
        """A policy that leaves no parameter training (at the start, or after a change) is said, not trained silently."""
        if self.runtime.trainable_count() == 0:
            self.log(
                "no parameter trains now: the freeze rules and the methods together leave none; steps change nothing",
                "warning",
            )

    def forget(self, recorded: int, undoable: int) -> None:
        """Drop what was recorded after the first ``recorded`` changes and ``undoable`` undo entries: those changes
        were taken back (out of memory), so policy.yaml replays as if they had never been made."""
        del self.recorded[recorded:]
        del self.undoable[undoable:]
        self.save_policy()

    def undo(self) -> str:
        """Put back the sections as they were before the last client change, as a change of its own (recorded, so replay stays exact)."""
        if not self.undoable:
            raise PolicyError("undo: nothing to undo (no change from a console since the engine started)")
        restore = undo_change(self.undoable[-1], self.runtime.current)
        self.runtime.apply_change(restore, source="undo")  # refused (e.g. LoRA has trained): nothing changes
        self.undoable.pop()
        return f"restored {', '.join(restore.set) or 'nothing (already as it was)'} as before the last change"

    def save_policy(self) -> None:
        if self.run_dir:
            self.unwritten.write(POLICY, lambda: write_policy(self.run_dir, self.replayable_policy()))
