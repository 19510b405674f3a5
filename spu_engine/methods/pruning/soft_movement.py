"""Soft movement pruning (Sanh, Wolf & Rush 2020): a score threshold instead of a fixed top-k.

Weights are kept while ``sigmoid(S) > tau``; an L1 penalty ``l1 * mean(sigmoid(S))``
pushes every score down, so only weights whose movement earns it keep a high
score, and each layer ends up with the sparsity its weights justify.  As in the
reference, the penalty grows with the ramp (``l1`` times its progress: none
during the warm-up, all of it from the end step), so the scores first learn
from the task alone.  The
threshold follows the cubic schedule from ``movement.threshold`` (or the
lowest score, if that is higher) to the threshold that removes ``final_sparsity`` of the weights (over all targets,
per unit with ``per_unit`` scope, or per tensor with ``per_layer``), so the run lands on the target at ``end_step``.
"""

from __future__ import annotations

from typing import Any

import torch

from spu_engine.methods.pruning.base import select
from spu_engine.methods.pruning.movement import MovementPruner
from spu_engine.methods.pruning.schedule import Ramp
from spu_engine.model.sharded import whole


class SoftMovementPruner(MovementPruner):
    name = "soft_movement"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tau_start: float | None = None  # where the threshold ramp starts; set by its first update
        self.tau: float | None = None  # the threshold in force (mean over tensors when scoped)

    def follow(self, ramp: Ramp, anchored: bool) -> None:
        super().follow(ramp, anchored)
        self.tau_start = self.tau if anchored else None

    @torch.no_grad()
    def update(self, target: float, step: int) -> None:
        ramp = self.ramp
        if step < ramp.start or step >= ramp.end or ramp.kind == "constant":
            super().apply(target)  # hold the initial sparsity, or land exactly on the target
            self.tau = None
            return
        probs = {n: torch.sigmoid(whole(s)) for n, s in self.scores().items()}  # sharded: thresholds from the whole
        if self.tau_start is None:  # a threshold below every score would waste the first part of the ramp
            self.tau_start = max(self.settings.movement.threshold, min(float(p.min()) for p in probs.values()))
        parts = self.partitions(list(probs))
        final_keep = select(probs, ramp.final, parts)
        finals = {}  # the final threshold of each part: the smallest probability the target keeps there
        for names in parts:
            lowest_kept = min(float(probs[n][final_keep[n]].min()) if final_keep[n].any() else 1.0 for n in names)
            finals.update(dict.fromkeys(names, lowest_kept))
        progress = ramp.progress(step)
        taus = {n: f + (self.tau_start - f) * (1.0 - progress) for n, f in finals.items()}
        for n, p in probs.items():
            self.masks.set(n, p > taus[n])
        self.tau = sum(taus.values()) / len(taus)

    def after_backward(self, step: int) -> None:
        """The L1 penalty l1 * progress * mean(sigmoid(S)), added straight to the score gradients."""
        super().after_backward(step)
        l1 = self.settings.movement.l1 * (self.ramp.progress(step) if self.ramp else 0.0)
        if not l1:
            return
        total = sum(s.numel() for s in self.score_params.values())
        with torch.no_grad():
            for s in self.score_params.values():
                sig = torch.sigmoid(s)
                penalty = sig * (1 - sig) * (l1 / total)
                s.grad = penalty if s.grad is None else s.grad.add_(penalty)

    def stats(self) -> dict[str, Any]:
        return {"pruning_threshold": round(self.tau, 6)} if self.tau is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tau_start": self.tau_start, "tau": self.tau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.tau_start = state.get("tau_start", self.tau_start)
        self.tau = state.get("tau")
