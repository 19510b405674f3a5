"""Soft movement pruning (Sanh, Wolf & Rush 2020): a score threshold instead of a fixed top-k.

Weights are kept while ``sigmoid(S) > tau``; an L1 penalty ``l1 * mean(sigmoid(S))``
(the mean of each target matrix's mean, as the reference's ``regularization`` takes it, so ``l1`` is its
``final_lambda``) pushes every score down, so only weights whose movement earns it keep a high
score, and each layer ends up with the sparsity its weights justify.  As in the
reference, the penalty grows with the ramp (``l1`` times its progress: none
during the warm-up, all of it from the end step), so the scores first learn
from the task alone.  The
threshold follows the cubic schedule from ``movement.threshold`` (or the
lowest score, if that is higher) to the threshold that removes ``final_sparsity`` of the weights (over all targets,
per unit with ``per_unit`` scope, or per tensor with ``per_layer``), so the run lands on the target at ``end_step``.
With ``movement.final_threshold`` it is the reference's own schedule instead: the cubic runs from
``movement.threshold`` to that number, every matrix keeps at least 0.5 % of its weights, the sparsity is
whatever the scores give, and the penalty is scaled by ``threshold / final_threshold``.
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

    def target(self, step: int) -> float | None:
        """No sparsity target when the reference's threshold schedule decides (``final_threshold``)."""
        return super().target(step) if self.settings.movement.final_threshold is None else None

    def before_step(self, step: int) -> None:
        if self.settings.movement.final_threshold is None or self.ramp is None:
            super().before_step(step)
            return
        self._hook_scores()
        if self.applied is None or self.ramp.due(step):
            self.follow_threshold(step)
            self.applied = self.sparsity()

    def scheduled_threshold(self, step: int) -> float:
        """The reference's threshold at ``step``: the cubic from where the ramp starts to ``final_threshold``."""
        mv = self.settings.movement
        start = self.tau_start if self.tau_start is not None else mv.threshold
        return mv.final_threshold + (start - mv.final_threshold) * (1.0 - self.ramp.progress(step))

    @torch.no_grad()
    def follow_threshold(self, step: int) -> None:
        """Every target keeps ``sigmoid(score) > tau``, and at least 0.5 % of its weights (the reference's floor)."""
        self.tau = self.scheduled_threshold(step)
        for n, s in self.scores().items():
            s = whole(s)
            keep, least = torch.sigmoid(s) > self.tau, int(0.005 * s.numel()) + 1
            if int(keep.sum()) < least:
                keep = s > s.flatten().kthvalue(max(s.numel() - least, 1)).values
            self.masks.set(n, keep)

    def after_backward(self, step: int) -> None:
        """The L1 penalty l1 * progress * mean over matrices of mean(sigmoid(S)), added straight to the score gradients
        (with ``final_threshold``: l1 * threshold / final_threshold, the reference's scaling)."""
        super().after_backward(step)
        mv = self.settings.movement
        if self.ramp is None:
            return
        if mv.final_threshold is None:
            l1 = mv.l1 * self.ramp.progress(step)
        else:
            l1 = mv.l1 * self.scheduled_threshold(step) / mv.final_threshold
        if not l1:
            return
        with torch.no_grad():
            for s in self.score_params.values():
                sig = torch.sigmoid(s)
                penalty = sig * (1 - sig) * (l1 / (s.numel() * len(self.score_params)))
                s.grad = penalty if s.grad is None else s.grad.add_(penalty)

    def stats(self) -> dict[str, Any]:
        return {"pruning_threshold": round(self.tau, 6)} if self.tau is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tau_start": self.tau_start, "tau": self.tau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.tau_start = state.get("tau_start", self.tau_start)
        self.tau = state.get("tau")
