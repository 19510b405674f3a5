"""Iterative magnitude pruning, lottery-ticket style (Frankle & Carbin 2019; Chen et al. 2020 for BERT).

Train ``round_steps``, remove ``fraction`` of the remaining target weights by
magnitude, then put every survivor (and every other parameter) back to the
reference weights and train again with fresh optimizer state; ``rounds`` times.
The reference is either the weights when IMP started (``reset: pretrained``;
at step 0 these are the pretrained weights) or the weights at an early step
(``reset: rewind`` to ``rewind_step``, Frankle et al. 2020).  Each round is an
event (``prune``) and a log line, so it shows on the console's timeline.
"""

from __future__ import annotations

from typing import Any

import torch

from ...policy import PolicyError
from .base import Pruner


class IMPPruner(Pruner):
    name = "imp"

    def __init__(self, host, masks, targets, settings, step: int) -> None:
        super().__init__(host, masks, targets, settings, step)
        self.rounds_done = 0
        self.start_sparsity = self.sparsity() if masks.masks else 0.0
        self.next_round = max(settings.schedule.start_step, step) + settings.imp.round_steps
        self.reference: dict[str, torch.Tensor] = {}
        self.reference_step: int | None = None
        if settings.imp.reset == "pretrained" or settings.imp.rewind_step is None:
            self._snapshot(step)

    @staticmethod
    def validate(settings, step: int, has_reference_at: int | None) -> None:
        imp = settings.imp
        if imp.reset != "rewind" or imp.rewind_step is None or has_reference_at == imp.rewind_step:
            return
        if imp.rewind_step < step:
            raise PolicyError(
                f"pruning.imp.rewind_step: step {imp.rewind_step} has passed (the run is at step {step}); "
                f"choose a rewind_step >= {step}, or reset: pretrained"
            )
        first_round = max(settings.schedule.start_step, step) + imp.round_steps
        if imp.rewind_step >= first_round:
            raise PolicyError(
                f"pruning.imp.rewind_step: {imp.rewind_step} is not before the first round at step {first_round} "
                f"(start_step + round_steps); rewinding needs weights saved before pruning starts"
            )

    def reconfigure(self, settings, step: int) -> None:
        old = self.settings.imp
        super().reconfigure(settings, step)
        if settings.imp.round_steps != old.round_steps:
            self.next_round = self.next_round - old.round_steps + settings.imp.round_steps
            self.next_round = max(self.next_round, step)
        if settings.imp.reset != old.reset or settings.imp.rewind_step != old.rewind_step:
            self.reference, self.reference_step = {}, None
            if settings.imp.reset == "pretrained" or settings.imp.rewind_step is None:
                self._snapshot(step)

    @torch.no_grad()
    def _snapshot(self, step: int) -> None:
        self.reference = {
            n: (self.masks.dense(n) if n in self.masks.masks else p.detach()).to("cpu", copy=True)
            for n, p in self.host.params.items()
        }
        self.reference_step = step

    def final_sparsity(self) -> float:
        imp = self.settings.imp
        return 1.0 - (1.0 - self.start_sparsity) * (1.0 - imp.fraction) ** imp.rounds

    def target(self, step: int) -> float | None:
        return self.final_sparsity()

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        return self.kept_first({n: self.masks.dense(n).abs().float() for n in self.targets})

    def before_step(self, step: int) -> None:
        imp = self.settings.imp
        if imp.reset == "rewind" and self.reference_step is None and step == imp.rewind_step:
            self._snapshot(step)
        if self.rounds_done >= imp.rounds or step < self.next_round:
            return
        self.rounds_done += 1
        self.next_round = step + imp.round_steps
        sparsity = 1.0 - (1.0 - self.sparsity()) * (1.0 - imp.fraction)
        self.apply(sparsity)
        self._reset()
        what = "pretrained weights" if imp.reset == "pretrained" else f"weights of step {self.reference_step}"
        self.host.emit("prune", step=step, method=self.name, round=self.rounds_done, rounds=imp.rounds, sparsity=round(self.sparsity(), 5), reset=imp.reset)
        self.host.log(
            f"IMP round {self.rounds_done}/{imp.rounds}: removed {imp.fraction:.0%} of the remaining weights "
            f"(sparsity {self.sparsity():.1%}); survivors reset to the {what}"
        )

    @torch.no_grad()
    def _reset(self) -> None:
        """Survivors (and all other parameters) back to the reference; optimizer state starts afresh."""
        reset = []
        for n, p in self.host.params.items():
            if n in self.reference:
                p.copy_(self.reference[n].to(p.device))
                reset.append(p)
                if n in self.masks.masks:
                    self.masks.rebase(n)
        self.host.forget_optimizer_state(reset)

    def stats(self) -> dict[str, Any]:
        return {"pruning_round": self.rounds_done}

    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds_done": self.rounds_done,
            "next_round": self.next_round,
            "start_sparsity": self.start_sparsity,
            "reference_step": self.reference_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_done = state.get("rounds_done", 0)
        self.next_round = state.get("next_round", self.next_round)
        self.start_sparsity = state.get("start_sparsity", self.start_sparsity)
        self.reference_step = state.get("reference_step")

    def tensor_state(self) -> dict[str, torch.Tensor]:
        return {f"reference.{n}": t for n, t in self.reference.items()}

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        prefix = "reference."
        loaded = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if loaded:
            self.reference = loaded
