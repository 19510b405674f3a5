"""Weight-update skipping (Safayanikoo & Akturk 2020).

Training alternates between two phases: ``full`` (every trainable tensor
updates) and ``bias_only`` (weights are skipped, only biases update; with
``last_k_blocks`` only the biases of the last k blocks).  A phase ends when the
eval loss has not improved on the phase's best for ``patience`` evaluations.
Skipped weights get no gradient and no optimizer update, and keep their
optimizer state for the next full phase.

Replay: every switch is a policy change ``{weight_update_skipping: {phase: X}}``
recorded in the timeline at the step it takes effect, so the exported policy
names every phase.  While the host's pending timeline still scripts a phase
switch (the run replays such a policy), the eval-driven rule only watches:
the script decides, so no switch is applied twice and the replay has the
recorded phases even when its eval losses differ.  After the last scripted
switch the rule takes over again, with its watch restarted at that switch.
"""

from __future__ import annotations

import math
from typing import Any

from spu_engine.core.policy import Change, Policy, PolicyError
from spu_engine.methods.base import Host, Method
from spu_engine.methods.targets import is_bias
from spu_engine.methods.weight_update_skipping.settings import WeightUpdateSkipping as Settings
from spu_engine.model.loading import Units

SOURCE = "weight_update_skipping"


class WeightUpdateSkipping(Method):
    section = "weight_update_skipping"

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.settings = Settings()
        self.phase: str | None = None  # None while disabled
        self.best = math.inf  # best eval loss of the current phase
        self.bad_evals = 0  # evals since the phase's best

    @property
    def active(self) -> bool:
        return self.settings.enabled

    def configure(self, policy: Policy, step: int) -> None:
        new = policy.weight_update_skipping
        blocks = self.host.units.num_blocks
        if new.last_k_blocks is not None and new.last_k_blocks > blocks:
            raise PolicyError(
                f"weight_update_skipping.last_k_blocks: {new.last_k_blocks} is more than the model's {blocks} blocks (allowed: 1-{blocks})"
            )
        phase = (new.phase or new.start_phase) if new.enabled else None
        if phase != self.phase:
            self.best, self.bad_evals = math.inf, 0
        self.settings, self.phase = new, phase

    def preview_notes(self, before: Policy, after: Policy) -> list[str]:
        wus = after.weight_update_skipping
        return (
            [f"weight-update skipping: phase {wus.phase or wus.start_phase} trains {wus.trains()}"]
            if wus.enabled
            else []
        )

    def gate_under(self, policy: Policy):
        settings = policy.weight_update_skipping
        if not settings.enabled or (settings.phase or settings.start_phase) != "bias_only":
            return None
        k = settings.last_k_blocks
        first = self.host.units.num_blocks - k if k is not None else None

        def bias_only(name: str) -> bool:
            if not is_bias(name):
                return False
            if first is None:
                return True
            index = _block_of(self.host.units, name)
            return index is not None and index >= first

        return bias_only

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        loss = metrics.get("eval_loss")
        if self.phase is None or loss is None or not math.isfinite(loss):
            return
        if loss < self.best:
            self.best, self.bad_evals = loss, 0
            return
        self.bad_evals += 1
        if self.bad_evals < self.settings.patience or self._scripted():
            return
        other = "full" if self.phase == "bias_only" else "bias_only"
        self.host.log(
            f"weight-update skipping: eval loss has not improved on {self.best:.4f} for {self.bad_evals} evals; phase {other}"
        )
        self.host.apply_change(Change(set={SOURCE: {"phase": other}}), source=SOURCE)

    def _scripted(self) -> bool:
        """Does the pending timeline still switch phases (a replayed policy)?"""
        return any("phase" in (e.set.get(SOURCE) or {}) for e in self.host.pending)

    def stats(self, step: int) -> dict[str, Any]:
        return {"wus_phase": self.phase} if self.phase else {}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best if math.isfinite(self.best) else None, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.best = math.inf if state.get("best") is None else float(state["best"])
            self.bad_evals = int(state.get("bad_evals", 0))


def _block_of(units: Units, name: str) -> int | None:
    """Block index of a parameter's unit, None for the embeddings and the head."""
    unit = units.unit_of.get(name, "")
    return int(unit[5:]) if unit.startswith("block") and unit[5:].isdigit() else None
