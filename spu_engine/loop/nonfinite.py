"""Steps whose update was skipped on the device (a non-finite loss or gradient): said, then acted on.

The device skips the update at once (``step_readout``); the host learns of it when the step's values arrive, a
step later.  It says where the batch went wrong and does what the policy's ``faults.on_nonfinite`` asks: ``skip``
(said, training goes on; after ``MAX_NONFINITE_SKIPS`` in a row it stops, since skipping does not help),
``pause`` or ``stop``, carried out at the next boundary by ``act``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from spu_engine.loop.faults import MAX_NONFINITE_SKIPS, nonfinite_report
from spu_engine.loop.lifecycle import Stop
from spu_engine.runtime.policy_runtime import PolicyRuntime, Reporter


class Control(Protocol):
    """What acting on a fault asks of the run's control (``lifecycle.RunControl``)."""

    stop: Stop | None

    def pause(self, message: str = "") -> None: ...
    def save_or_pause(self) -> None: ...


class NonfiniteSteps:
    """The streak of skipped steps and the action one of them asked for, until the boundary carries it out."""

    def __init__(self, runtime: PolicyRuntime, reporter: Reporter, control: Control) -> None:
        self.runtime, self.reporter, self.control = runtime, reporter, control
        self.streak = 0
        self.asked: str | None = None  # "pause" or "stop"
        self.message = ""

    def finite(self) -> None:
        self.streak = 0

    @torch.no_grad()
    def skipped(self, step: int, loss_value: float, bad_grads: list[str]) -> None:
        """Step ``step`` had a non-finite loss or gradient (``bad_grads``: the tensors) and did not update."""
        report = nonfinite_report(self.runtime.params, self.runtime.units, loss_value, step, bad_grads)
        self.streak += 1
        action, message = self.runtime.current.faults.on_nonfinite, report["message"]
        if action == "skip" and self.streak >= MAX_NONFINITE_SKIPS:
            action = "stop"
            message += f"; {self.streak} batches in a row, so skipping does not help"
        message += {"skip": "; batch skipped", "pause": "; paused", "stop": "; stopping"}[action]
        fields: dict[str, Any] = {"units": report["units"], "weights": report["weights"], "action": action}
        self.reporter.emit("error", step=step, message=message, kind="nonfinite", loss=str(loss_value), **fields)
        if action != "skip":
            self.asked, self.message = action, message

    def act(self) -> None:
        """Pause or stop now, as a skipped step asked (nothing when none did)."""
        asked, self.asked = self.asked, None
        if asked == "pause":
            self.control.pause(self.message)
        elif asked == "stop":
            self.control.stop = Stop(self.message, fault=True, owes_checkpoint=True)
            self.control.save_or_pause()
