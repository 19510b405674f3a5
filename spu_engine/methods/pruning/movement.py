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

A pruned weight does not learn while its score does: its value
stays in the latent store, and its optimizer moments are put back after each
optimizer step, so neither drifts while it is pruned (the reference's ``W * M``
gives it a zero gradient, but Adam's momentum and weight decay still move it
there: a deliberate difference, measured in the README's "Claims") (the copies this takes
cost AdamW's two floats per target weight of memory).  The scores learn from
the method's first step; the ramp waits for them (``PruningMethod.window``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spu_engine.methods.pruning.base import ScheduledPruner
from spu_engine.model.sharded import laid_out_like, whole

GROUP = "scores"  # the optimizer group of the scores
TIE_BREAK = 1e-6  # far below one step of score (score_lr), far above float32 resolution of early scores


class MovementPruner(ScheduledPruner):
    name = "movement"
    rerank = True
    warm_up = True

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
        self._pruned: tuple[int, dict[str, torch.Tensor | None]] = (-1, {})  # (masks version, bool where pruned)
        self._held: list[
            tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        ] = []  # (moment, where pruned, its copy before the step)
        self._spare: dict[tuple[str, int], torch.Tensor] = {}  # the copies, kept: allocating them each step costs more

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

    def pruned_where(self, name: str) -> torch.Tensor | None:
        """Bool tensor of the pruned entries of ``name``, None if there are none (cached until the masks change)."""
        if self._pruned[0] != self.masks.version:
            self._pruned = (self.masks.version, {})
        cache = self._pruned[1]
        if name not in cache:
            where = ~self.masks.keep(name)
            cache[name] = where if where.any() else None
        return cache[name]

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """Copy the optimizer moments of weights with pruned entries; those entries are put back after the step.

        Whole copies and ``where``: 4x faster than gathering the pruned entries (masked_select) on CPU.  A weight
        without moments yet (before its first step) is left alone: its pruned entries start from their gradient
        rather than from zeros that would then stay (``sqrt`` of zeros is slow on x86)."""
        self._held = []
        for name in self._hooks:
            p = self.masks.param(name)
            where = self.pruned_where(name)
            if p.grad is None or where is None:
                continue
            moments = [t for t in self.host.optimizer_state(p).values() if torch.is_tensor(t) and t.shape == p.shape]
            for i, moment in enumerate(moments):
                copy = self._spare.get((name, i))
                if copy is None or copy.dtype != moment.dtype or copy.device != moment.device:
                    copy = self._spare[(name, i)] = torch.empty_like(moment)
                self._held.append((moment, where, copy.copy_(moment)))

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        for moment, where, before in self._held:
            torch.where(where, before, moment, out=moment)
        self._held = []

    def reconfigure(self, settings, step: int) -> None:
        super().reconfigure(settings, step)
        self.host.set_group_lr(GROUP, settings.movement.score_lr)

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        """The learned scores; ties (scores that have not moved yet, as at the start) go to the larger weight."""
        magnitude = {n: self.masks.dense(n).abs() for n in self.score_params}
        scale = TIE_BREAK / max(float(whole(m.max())) for m in magnitude.values())
        return {n: s.detach() + magnitude[n] * scale for n, s in self.score_params.items()}

    def detach(self) -> None:
        self.host.remove_parameters(GROUP)
        self._unhook_scores()
        self.score_params.clear()
        self._spare, self._held = {}, []

    def tensor_state(self) -> dict[str, torch.Tensor]:
        return {f"score.{n}": s.detach() for n, s in self.score_params.items()}

    @torch.no_grad()
    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, s in self.score_params.items():
            if f"score.{n}" in tensors:
                s.copy_(laid_out_like(tensors[f"score.{n}"].to(s.device), s))
