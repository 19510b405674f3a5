"""Movement pruning (Sanh, Wolf & Rush 2020): keep the weights that move away from zero.

Every target weight gets a learned score S.  The forward pass uses
``W' = W * TopK(S)``; the straight-through estimator passes ``dL/dW' * W`` to
the scores, so a weight whose updates push it toward zero (``dL/dW * W > 0``)
loses score and is pruned, whatever its size.  The masks live in the weights
(``masks.py``), so the backward pass already yields ``dL/dW'`` for every
entry; the score gradient is that times the dense weight, set by a hook as
soon as backward has accumulated the weight's gradient (so before any
gradient clipping, in the engine and in a user's own loop alike), with no
extra work in the forward pass.
The scores are trained only where the weight is: a frozen weight does not
move, so its score does not either.  The scores have their own
learning rate (``movement.score_lr``) and live outside the model, so they
are not parameters of any unit.  Masks follow the scores every
``schedule.every`` steps (a global ranking of millions of scores costs about a
tenth of a MiniLM step on CPU; doing it every step would break the 5 % budget).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import ScheduledPruner

GROUP = "scores"  # the optimizer group of the scores
TIE_BREAK = 1e-6  # far below one step of score (score_lr), far above float32 resolution of early scores


class MovementPruner(ScheduledPruner):
    name = "movement"
    rerank = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.score_params: dict[str, nn.Parameter] = {}
        for n in self.targets:
            p = self.masks.param(n)
            if n not in self.masks.masks:
                self.masks.set(n, torch.ones_like(p, dtype=torch.bool))
            # scores start at 0; weights pruned before this method took over start one step of score behind
            init = (self.masks.keep(n).float() - 1.0) * self.settings.movement.score_lr
            self.score_params[n] = nn.Parameter(init)
        self.host.add_parameters(list(self.score_params.values()), lr=self.settings.movement.score_lr, name=GROUP)
        self._hooks: dict[str, Any] = {}  # target -> its gradient hook, once the weight trains
        self._hook_scores()

    def _hook_scores(self) -> None:
        """Hook every target that trains now (a frozen weight takes no hook; it may be unfrozen later)."""
        for n in self.score_params:
            p = self.masks.param(n)
            if n not in self._hooks and p.requires_grad:
                self._hooks[n] = p.register_post_accumulate_grad_hook(self._score_grad(n))

    def _unhook_scores(self) -> None:
        for h in self._hooks.values():
            h.remove()
        self._hooks = {}

    def before_step(self, step: int) -> None:
        self._hook_scores()
        super().before_step(step)

    def _score_grad(self, name: str):
        score = self.score_params[name]

        @torch.no_grad()
        def straight_through(weight: nn.Parameter) -> None:
            """dL/dS = dL/dW' * W for kept and pruned weights alike (set, not added: accumulated micro-batches are summed in W's grad)."""
            score.grad = weight.grad * self.masks.dense(name)

        return straight_through

    def reconfigure(self, settings, step: int) -> None:
        super().reconfigure(settings, step)
        self.host.set_group_lr(GROUP, settings.movement.score_lr)

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        """The learned scores; ties (scores that have not moved yet, as at the start) go to the larger weight."""
        magnitude = {n: self.masks.dense(n).abs() for n in self.score_params}
        scale = TIE_BREAK / max(float(m.max()) for m in magnitude.values())
        return {n: s.detach() + magnitude[n] * scale for n, s in self.score_params.items()}

    def detach(self) -> None:
        self.host.remove_parameters(GROUP)
        self._unhook_scores()
        self.score_params.clear()

    def tensor_state(self) -> dict[str, torch.Tensor]:
        return {f"score.{n}": s.detach() for n, s in self.score_params.items()}

    @torch.no_grad()
    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, s in self.score_params.items():
            if f"score.{n}" in tensors:
                s.copy_(tensors[f"score.{n}"])
