"""A change from a console that runs out of memory is taken back, and training goes on.

Out of memory elsewhere pauses the run (``Trainer.survive_oom``); after a change that would only fail again on
resume.  So a console's change is on probation from the boundary that applied it until a step after it completes:
if applying it or that step runs out of memory, the policy before it is restored, its record dropped (policy.yaml
replays as if it was never made), an ``error`` event names the change and the memory figures, and the run trains
on.  Changes from the timeline or a trigger are the policy's own: they keep the plain answer, as does a
multi-process run (every rank would have to agree on the rollback).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from spu_engine.core.memory_view import memory_kind, size
from spu_engine.core.policy import Change, Policy, PolicyError, undo_change
from spu_engine.core.protocol import MemoryPreview
from spu_engine.core.run_metrics import describe_change
from spu_engine.loop.faults import free_memory
from spu_engine.loop.policy_record import PolicyRecord
from spu_engine.runtime.policy_runtime import PolicyRuntime, Reporter


@dataclass
class Probation:
    """The console's changes at one boundary, and what to restore if the step after them runs out of memory."""

    step: int
    before: Policy  # the sections in force before the first of them
    recorded: int  # the record's lengths then
    undoable: int
    changes: list[Change] = field(default_factory=list)


def figures(memory: dict[str, Any]) -> str:
    """``estimated device memory 1.42 GiB without it, 1.61 GiB with it, of 0.90 GiB available``."""
    m = MemoryPreview.model_validate(memory)
    available = f", of {size(m.available)} available" if m.available is not None else ""
    unmeasured = " (no step measured yet: activations not counted)" if m.after.activations is None else ""
    return (
        f"estimated {memory_kind(m)} {size(m.before.total)} without it, {size(m.after.total)} with it{available}"
        f"{unmeasured}"
    )


class ChangeRollback:
    """Watches the changes the runtime takes (``RuntimeHooks.applied``, before the record hears of them)."""

    def __init__(
        self,
        runtime: PolicyRuntime,
        record: PolicyRecord,
        reporter: Reporter,
        clock: Callable[[], int],
        device: torch.device,
        multi_process: bool,
    ) -> None:
        self.runtime, self.record, self.reporter, self.clock = runtime, record, reporter, clock
        self.device, self.multi_process = device, multi_process
        self.probation: Probation | None = None

    def applied(self, change: Change, source: str, before: Policy, names: list[str]) -> None:
        """A change in force: a console's opens (or extends) this boundary's probation, any other ends it."""
        step, probation = self.clock(), self.probation
        if probation is None or probation.step != step:
            probation = Probation(step, before, len(self.record.recorded), len(self.record.undoable))
        if source == "client" and not self.multi_process:
            probation.changes.append(change)
            self.probation = probation
        else:
            self.probation = None
        self.record.changed(change, source, before, names)

    def change_out_of_memory(self, name: str, change: Change | None, detail: str) -> str:
        """The refusal of command ``name``, whose change ran out of memory while being applied (the runtime put
        everything back), with the estimate of what it would have needed."""
        free_memory(self.device)
        rt, what, estimate = self.runtime, "", ""
        if change is not None:
            what = f" ({describe_change(_wire(change))})"
            try:
                estimate = "; " + figures(rt.memory.what_if(rt.current, rt.current.apply(change)))
            except PolicyError:
                pass
        return (
            f"{name}: out of memory applying it at step {self.clock()}{what}: {detail}; nothing changed, training goes "
            f"on{estimate}"
        )

    def rolled_back(self, detail: str) -> bool:
        """The step after this boundary's console changes ran out of memory: take them back (True), or leave the
        plain answer to the caller (False: no change on probation, or it cannot be taken back)."""
        probation, self.probation = self.probation, None
        if probation is None or probation.step != self.clock() or not probation.changes:
            return False
        rt = self.runtime
        memory = rt.memory.what_if(probation.before, rt.current)
        names, restoring = rt.param_names, undo_change(probation.before, rt.current)
        try:
            rt.restore(probation.before)
        except PolicyError:
            return False
        free_memory(self.device)
        self.record.forget(probation.recorded, probation.undoable)
        self.record.announce(restoring, "rollback", names)
        what = "; ".join(describe_change(_wire(c)) for c in probation.changes)
        self.reporter.emit(
            "error",
            step=self.clock(),
            kind="oom",
            message=(
                f"out of memory in the first step after the change at step {probation.step} ({what}): {detail}; "
                f"rolled back to the policy before it, training goes on; {figures(memory)}"
            ),
        )
        return True


def _wire(change: Change) -> dict[str, Any]:
    return change.model_dump(mode="json", exclude_none=True)
