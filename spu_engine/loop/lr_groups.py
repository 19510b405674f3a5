"""The engine's optimizer groups, kept in step with the policy: one group per method group and (learning-rate
multiplier, warm-in start), split and merged in place so every tensor keeps its AdamW state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from spu_engine.runtime.policy_runtime import PolicyRuntime


def regroup(
    optimizer: torch.optim.Optimizer, key_of: dict[int, tuple[float, int | None]], order: dict[int, int]
) -> None:
    """Split every named group into one group per (lr multiplier, warm-in start) of its tensors, in place.

    Groups keep their name, base lr and weight decay; a tensor's AdamW state is keyed by the tensor, so moving it
    between groups keeps its moments.  Tensors sit in model order (``order``) and groups in a fixed order, so the
    same multipliers always give the same groups (a checkpoint's optimizer state loads into them).
    """
    families: dict[Any, tuple[dict[str, Any], list[torch.nn.Parameter]]] = {}
    for g in optimizer.param_groups:
        template = {k: v for k, v in g.items() if k not in ("params", "lr_scale", "warm_from")}
        families.setdefault(g.get("name"), (template, []))[1].extend(g["params"])
    groups = []
    for template, params in families.values():
        params.sort(key=lambda p: order.get(id(p), len(order)))
        buckets: dict[tuple[float, int | None], list[torch.nn.Parameter]] = {}
        for p in params:
            buckets.setdefault(key_of.get(id(p), (1.0, None)), []).append(p)
        for scale, warm in sorted(buckets, key=lambda k: (k != (1.0, None), k[0], -1 if k[1] is None else k[1])):
            groups.append({**template, "params": buckets[(scale, warm)], "lr_scale": scale, "warm_from": warm})
    optimizer.param_groups[:] = groups


def group_lr_scale(group: dict[str, Any], step: int, warm_in: int) -> float:
    """The group's multiplier, ramped in linearly over ``warm_in`` steps from its warm-in start: 1/warm_in at that step."""
    scale = group.get("lr_scale", 1.0)
    start = group.get("warm_from")
    if start is not None and warm_in:
        scale *= min(1.0, (step - start + 1) / warm_in)
    return scale


class LrGroups:
    """The engine's optimizer groups following the policy: one per method group and (lr multiplier, warm-in start).

    The runtime tells it of every change (``taken``, wired as ``RuntimeHooks.taken``); the own-loop controller has
    none, its optimizer's groups being the user's."""

    def __init__(self, runtime: PolicyRuntime, clock: Callable[[], int]) -> None:
        self.runtime = runtime
        self.clock = clock
        self.warm_from: dict[str, int] = {}  # stable name -> the step its warm-in (lr.warm_in) began, while it ramps
        # the boundary of the last change that froze tensors (-1: before the first step, a resumed run's included);
        # None: nothing to drop
        self.frozen_at: int | None = -1

    def regroup(self) -> None:
        """One group per method group and (lr multiplier, warm-in start); AdamW state stays with each tensor."""
        scales = self.runtime.lr_multipliers()
        params = self.runtime.params
        key_of = {id(p): (scales.get(n, 1.0), self.warm_from.get(n)) for n, p in params.items()}
        regroup(self.runtime.optimizer, key_of, {id(p): i for i, p in enumerate(params.values())})

    def taken(self, before: set[str] | None) -> None:
        """After a change (``before``: the names that trained before it; None: refused): a tensor that starts training
        after step 0 ramps in (``lr.warm_in``), and the groups follow the multipliers (also after a refusal, which
        may have re-added a method's group)."""
        step, params = self.clock(), self.runtime.params
        if before is not None and step > 0 and self.runtime.current.lr.warm_in:
            self.warm_from.update({n: step for n, p in params.items() if p.requires_grad and n not in before})
        if before is not None and any(not params[n].requires_grad for n in before if n in params):
            self.frozen_at = step
        self.regroup()

    def drop_frozen_state(self, step: int) -> None:
        """Frozen tensors lose their AdamW state (moments and step count), so neither memory nor a checkpoint holds it
        for what does not train (a live LoRA switch froze the whole base model); one that trains again starts with
        fresh moments, as a new tensor does.  Not at the boundary of the change that froze them: if the step after it
        runs out of memory, the change is taken back (``change_rollback``) with the state as it was.  A resumed run
        drops at its first step what its checkpoint still held, which changes nothing it computes: a frozen tensor's
        state is never read.  Methods may keep some (automatic freezing's ``optimizer_state: keep``)."""
        if self.frozen_at is None or step <= self.frozen_at:
            return
        optimizer, current = self.runtime.optimizer, self.runtime.current
        kept = {n for m in self.runtime.methods for n in m.keeps_frozen_state(current)}
        stale = [
            p for n, p in self.runtime.params.items() if not p.requires_grad and p in optimizer.state and n not in kept
        ]
        self.runtime.forget_optimizer_state(stale)
        self.frozen_at = None

    def end_ramps(self, step: int) -> None:
        """Tensors whose warm-in is over at ``step`` go back to their plain group; frozen tensors lose their state."""
        self.drop_frozen_state(step)
        warm_in = self.runtime.current.lr.warm_in
        done = [n for n, start in self.warm_from.items() if step - start >= warm_in or n not in self.runtime.params]
        if done:
            for n in done:
                del self.warm_from[n]
            self.regroup()
