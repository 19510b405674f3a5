"""The small interface every pruning method implements, and the shared top-k selection.

A pruner says *which* weights matter (``scores``: higher keeps) and *when*
masks change (``before_step``).  Selection is shared: keep the highest scores,
over all targets at once (``global`` scope), unit by unit (``per_unit``) or
tensor by tensor (``per_layer``), pruning exactly ``round(sparsity * n)`` weights like
``torch.nn.utils.prune``'s L1Unstructured does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from spu_engine.methods.base import Checkpointed
from spu_engine.methods.pruning.masks import MaskedWeights
from spu_engine.methods.pruning.schedule import Ramp
from spu_engine.methods.pruning.structure import Family, families, select_groups
from spu_engine.model.sharded import whole

if TYPE_CHECKING:
    from spu_engine.methods.base import Host
    from spu_engine.methods.pruning.settings import Pruning


def lowest(flat: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Bool keep-mask of a 1-D tensor with its ``n_prune`` smallest entries removed."""
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune <= 0:
        return keep
    if n_prune >= flat.numel():
        return torch.zeros_like(keep)
    # kthvalue is ~8x faster than topk on millions of scores; ties at the threshold go in index order
    threshold = flat.kthvalue(n_prune).values
    below = flat < threshold
    keep[below] = False
    missing = n_prune - int(below.sum())
    if missing > 0:
        keep[(flat == threshold).nonzero().flatten()[:missing]] = False
    return keep


def select(scores: dict[str, torch.Tensor], sparsity: float, parts: list[list[str]]) -> dict[str, torch.Tensor]:
    """Keep-masks that remove ``sparsity`` of the weights with the lowest scores within each part (a list of names)."""
    out = {}
    for names in parts:
        flat = torch.cat([scores[n].flatten() for n in names])
        keep = lowest(flat, round(sparsity * flat.numel()))
        offset = 0
        for n in names:
            out[n] = keep[offset : offset + scores[n].numel()].view_as(scores[n])
            offset += scores[n].numel()
    return out


class Pruner(Checkpointed):
    """One pruning method: its scores and its clock.  The host-facing ``PruningMethod`` owns the masks."""

    name: ClassVar[str]
    warm_up: ClassVar[bool] = (
        False  # learned scores: the ramp holds initial_sparsity until it starts (see PruningMethod.window)
    )

    def __init__(self, host: Host, masks: MaskedWeights, targets: list[str], settings: Pruning, step: int) -> None:
        self.host = host
        self.masks = masks
        self.targets = targets
        self.settings = settings
        self._families: list[Family] | None = None  # heads and neurons over the targets, for structure: heads_neurons

    def reconfigure(self, settings: Pruning, step: int) -> None:
        """New settings for the same method and targets (validated already)."""
        self.settings = settings

    def scores(self) -> dict[str, torch.Tensor]:
        """Importance of every target weight (float, higher keeps)."""
        raise NotImplementedError

    def target(self, step: int) -> float | None:
        """The sparsity this method aims at now, for the console; None before it starts."""
        return None

    def before_step(self, step: int) -> None:
        """Update masks if the method's clock says so."""

    def after_backward(self, step: int) -> None:
        pass

    def after_optimizer_step(self, step: int) -> None:
        pass

    def after_step(self, step: int, loss: float, seconds: float, began: float) -> None:
        pass

    def eval_due(self, step: int) -> bool:
        return False

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def detach(self) -> None:
        """This method is being replaced or switched off: remove what it added."""

    def stats(self) -> dict[str, Any]:
        return {}

    # -- shared helpers --------------------------------------------------------

    def sparsity(self) -> float:
        total = sum(self.masks.param(n).numel() for n in self.targets)
        return sum(self.masks.pruned(n) for n in self.targets) / total

    def apply(self, sparsity: float) -> None:
        """Recompute every target's mask from this method's scores."""
        if self.settings.structure == "heads_neurons":
            if self._families is None:
                self._families = families(self.host.model, self.targets)
            scores = {n: whole(s) for n, s in self.scores().items()}
            chosen = select_groups(self._families, scores, sparsity, self.settings.scope)
        else:  # on sharded weights every rank ranks the whole scores alike: one threshold, as one process has it
            scores = {n: whole(s) for n, s in self.scores().items()}
            chosen = select(scores, sparsity, self.partitions(list(scores)))
        for name, keep in chosen.items():
            self.masks.set(name, keep)

    def partitions(self, names: list[str]) -> list[list[str]]:
        """The groups ranked separately: all names (global), each unit's (per_unit), or each tensor (per_layer)."""
        scope = self.settings.scope
        if scope == "global":
            return [names]
        if scope == "per_layer":
            return [[n] for n in names]
        by_unit: dict[str, list[str]] = {}
        for n in names:
            by_unit.setdefault(self.host.units.unit_of.get(n, "other"), []).append(n)
        return list(by_unit.values())

    def kept_first(self, magnitude: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scores where weights still kept outrank every pruned one.

        Raising sparsity then prunes only among kept weights (pruned ones stay
        pruned, as with ``torch.nn.utils.prune``'s iterative pruning); lowering it
        regrows the pruned weights with the largest scores.
        """
        magnitude = {n: whole(s) for n, s in magnitude.items()}  # sharded: ranked whole, on every rank alike
        top = max(float(s.max()) for s in magnitude.values()) + 1.0
        out = {}
        for n, s in magnitude.items():
            if n in self.masks.masks:
                s = s + whole(self.masks.keep(n)).to(s.dtype) * top
            out[n] = s
        return out


class ScheduledPruner(Pruner):
    """A pruner whose sparsity follows the policy's ramp (magnitude, movement, soft movement)."""

    rerank: ClassVar[bool] = False  # re-rank at every due step even when the target is unchanged (scores move)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ramp: Ramp | None = None  # set by PruningMethod
        self.applied: float | None = None  # sparsity of the last mask update; None forces one at the next step

    def follow(self, ramp: Ramp, anchored: bool) -> None:
        """Take a new ramp; an anchored one (a live change) starts from the current masks."""
        self.ramp = ramp
        if anchored:
            self.applied = None

    def target(self, step: int) -> float | None:
        return self.ramp.sparsity(step) if self.ramp else None

    def before_step(self, step: int) -> None:
        target = self.target(step)
        if target is None or (self.applied is not None and not self.ramp.due(step)):
            return
        if target == self.applied and (not self.rerank or target == 0.0):  # nothing to re-rank at zero sparsity
            return
        self.update(target, step)
        self.applied = target

    def update(self, target: float, step: int) -> None:
        """The masks for the ramp's ``target`` at ``step`` (soft movement's threshold also follows the step)."""
        self.apply(target)

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.applied = state.get("applied")
