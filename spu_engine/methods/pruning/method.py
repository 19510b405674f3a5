"""Pruning as a method: the ``pruning`` policy section, steerable live.

This class owns the masks and the ramp; the pruner of the chosen method
(magnitude, imp, movement, soft_movement) supplies the scores and decides when
masks change.  A live change keeps the masks: a new target, end step, scope
or method starts a new ramp at the current step from the current sparsity,
so the curve continues without a jump, and a lower target regrows weights by
the new method's own scores.  ``method: none`` removes the masks (the latent
weights come back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from spu_engine.core.policy import PolicyError
from spu_engine.methods.base import Host, Method
from spu_engine.methods.pruning.base import Pruner, ScheduledPruner
from spu_engine.methods.pruning.imp import IMPPruner
from spu_engine.methods.pruning.layout import sublayer
from spu_engine.methods.pruning.magnitude import MagnitudePruner
from spu_engine.methods.pruning.masks import MaskedWeights
from spu_engine.methods.pruning.movement import MovementPruner
from spu_engine.methods.pruning.reach import reach_note, reached_by
from spu_engine.methods.pruning.schedule import Ramp
from spu_engine.methods.pruning.settings import Pruning
from spu_engine.methods.pruning.soft_movement import SoftMovementPruner
from spu_engine.methods.pruning.structure import families
from spu_engine.runtime.selection import globbed

if TYPE_CHECKING:
    from spu_engine.core.policy import Policy

PRUNERS: dict[str, type[Pruner]] = {p.name: p for p in (MagnitudePruner, IMPPruner, MovementPruner, SoftMovementPruner)}


class PruningMethod(Method):
    section = "pruning"

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.settings = Pruning()
        self.masks = MaskedWeights(host.model)
        self.pruner: Pruner | None = None
        self.targets: list[str] = []
        self._counts: tuple[int, dict[str, int]] | None = None  # (masks version, pruned per tensor)
        self._shown = 0  # masks version the last step event reported

    @property
    def active(self) -> bool:
        return self.pruner is not None

    # -- policy ----------------------------------------------------------------

    def configure(self, policy: Policy, step: int) -> None:
        new = policy.pruning
        if new == self.settings:
            return
        if new.method == "none":
            self._switch_off()
            self.settings = new
            return
        targets = self.resolve_targets(new)
        if not self.masks.masks and self.masks.model is not self.host.model:  # a method (PEFT) wrapped the model
            self.masks = MaskedWeights(self.host.model)
        if new.method == "imp":
            ref = self.pruner.reference_step if isinstance(self.pruner, IMPPruner) else None
            IMPPruner.validate(new, step, ref, self.host.config.steps)
        old, self.settings = self.settings, new
        same_pruner = self.pruner is not None and old.method == new.method and targets == self.targets
        if same_pruner:
            self.pruner.reconfigure(new, step)
        else:
            if self.pruner is not None:
                self.pruner.detach()
            for name in set(self.masks.masks) - set(targets):
                self.masks.drop(name)
            self.targets = targets
            self._counts = None
            self.pruner = PRUNERS[new.method](self.host, self.masks, targets, new, step)
        start, end = self.window(new)
        if isinstance(self.pruner, ScheduledPruner) and (not same_pruner or self._schedule_changed(old, new)):
            anchored = step > start
            self.pruner.follow(self._ramp(new, step, anchored), anchored)
            if self.pruner.warm_up and (start, end) != (new.schedule.start_step, new.schedule.end_step):
                self.host.log(
                    f"{new.method}: scores learn from now, the ramp runs from step {start} to {end} (movement.warmup, movement.final_hold)"
                )
        if isinstance(self.pruner, IMPPruner):  # the last round is trained round_steps too, then reported
            end = self.pruner.next_round + (new.imp.rounds - self.pruner.rounds_done) * self.pruner.round_steps
        outside = self.outside_blocks(self.targets)
        if outside and not same_pruner:
            self.host.log(
                f"pruning.targets include {len(outside)} tensors outside the blocks ({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''}): "
                "pruning the task head or the embeddings can leave a model that predicts one class; leave targets unset to prune the blocks only",
                "warning",
            )
        steps = self.host.config.steps
        if steps is not None and end > steps and isinstance(self.pruner, IMPPruner):
            self.host.log(
                f"pruning.imp: the last round ends at step {end} (every round, the last included, trains round_steps), "
                f"after the run's last step ({steps}): the rounds that do not end in time are not reported",
                "warning",
            )
        elif steps is not None and end > steps - 1 and isinstance(self.pruner, ScheduledPruner) and self.pruner.ramp:
            self.host.log(reach_note(self.pruner.ramp, steps - 1, "pruning"), "warning")

    @staticmethod
    def _schedule_changed(old: Pruning, new: Pruning) -> bool:
        return (old.schedule, old.scope, old.structure, old.movement.warmup, old.movement.final_hold) != (
            new.schedule,
            new.scope,
            new.structure,
            new.movement.warmup,
            new.movement.final_hold,
        )

    def window(self, settings: Pruning) -> tuple[int, int]:
        """The ramp's start and end steps.  ``end_step`` unset is the run's last step, so the final sparsity is what the
        run ends at.  Scores need signal before the first mask and the run needs steps to recover after the last
        (Sanh et al.'s initial and final warm-up), so movement's ramp waits ``movement.warmup`` of the run when
        ``start_step`` is 0 and ends ``movement.final_hold`` of the run before its last step at the latest."""
        s, mv, steps = settings.schedule, settings.movement, self.host.config.steps
        if s.end_step is None and steps is None:
            raise PolicyError(
                "pruning.schedule.end_step: this loop does not say its length (attach(..., steps=N)); set end_step"
            )
        end = s.end_step if s.end_step is not None else max(s.start_step, steps - 1)
        if not PRUNERS[settings.method].warm_up or steps is None:
            return s.start_step, end
        start = s.start_step or round(mv.warmup * steps)
        return start, max(start, min(end, steps - round(mv.final_hold * steps)))

    def _ramp(self, settings: Pruning, step: int, anchored: bool) -> Ramp:
        s = settings.schedule
        start, end = self.window(settings)
        hold = PRUNERS[settings.method].warm_up
        if anchored:  # continue from the masks we have, reach the (new) target at the (new) end step
            return Ramp(step, max(end, step), self.sparsity(), s.final_sparsity, s.every, s.kind, hold)
        return Ramp(start, end, s.initial_sparsity, s.final_sparsity, s.every, s.kind, hold)

    def resolve_targets(self, settings: Pruning) -> list[str]:
        """Weight matrices selected by ``targets`` (unset: the blocks' own) and not by ``exclude``; PolicyError if none."""
        params = self.host.params
        if (
            settings.targets is None
        ):  # the model's own weights inside the blocks: never the head, never a PEFT method's tensors
            selected = [n for n in self.host.loaded_names if self.host.units.unit_for(n).startswith("block")]
        else:
            selected = globbed(self.host.param_names, settings.targets)
        excluded = set(globbed(selected, settings.exclude))
        chosen = [n for n in selected if n not in excluded]
        if not chosen:
            what = "the blocks' weights" if settings.targets is None else str(settings.targets)
            raise PolicyError(
                f"pruning.targets: {what} minus pruning.exclude {settings.exclude} leaves no parameter of this model to prune"
            )
        matrices = [n for n in chosen if params[n].dim() >= 2]
        if not matrices:
            raise PolicyError(
                f"pruning.targets: the selected parameters ({', '.join(chosen[:3])}{', ...' if len(chosen) > 3 else ''}) are all "
                "1-D (biases, norms); pruning removes entries of weight matrices, e.g. targets: ['*.weight']"
            )
        if settings.structure == "heads_neurons":  # only weights that belong to a whole head or neuron
            grouped = {s.name for f in families(self.host.model, matrices) for s in f.slabs}
            if not grouped:
                raise PolicyError(
                    f"pruning.structure: heads_neurons needs targets that cover whole heads (q, k, v and output projection) "
                    f"or FFN pairs (input and output layers) of {type(self.host.model).__name__}; {settings.targets} cover none"
                )
            matrices = [n for n in matrices if n in grouped]
        return matrices

    def outside_blocks(self, targets: list[str]) -> list[str]:
        """Targets in the embeddings or the head (pooler, classifier): pruned only when a pattern names them."""
        return [n for n in targets if not self.host.units.unit_for(n).startswith("block")]

    def target_sparsity(self, policy: Policy) -> float | None:
        """What the run's end reaches under ``policy`` (the what-if's ``sparsity → ...``): the final sparsity, or less
        where the schedule ends after the run's last step."""
        if policy.pruning.method == "none":
            return None
        if policy.pruning.method == "soft_movement" and policy.pruning.movement.final_threshold is not None:
            return None  # the reference's threshold schedule: the scores decide the sparsity
        ramp, steps = self._preview_ramp(policy.pruning), self.host.config.steps
        if ramp is None or steps is None:
            return policy.pruning.schedule.final_sparsity
        return reached_by(ramp, steps - 1) or 0.0

    def preview_notes(self, before: Policy, after: Policy) -> list[str]:
        if after.pruning.method == "none":
            return []
        notes = []
        ramp, steps = self._preview_ramp(after.pruning), self.host.config.steps
        if after.pruning != before.pruning and ramp is not None and steps is not None:
            notes.append(reach_note(ramp, steps - 1, f"{after.pruning.method} pruning"))
        outside = self.outside_blocks(self.resolve_targets(after.pruning))
        if outside:
            notes.append(
                f"pruning reaches {len(outside)} tensors outside the blocks ({outside[0]}, ...): the head may collapse"
            )
        return notes

    def _preview_ramp(self, settings: Pruning) -> Ramp | None:
        """The ramp ``settings`` would follow from the step now: the one in force if they are unchanged, else a new
        one as ``configure`` would start it; None for IMP (its rounds say their own end when configured)."""
        if not issubclass(PRUNERS[settings.method], ScheduledPruner):
            return None
        if settings == self.settings and isinstance(self.pruner, ScheduledPruner) and self.pruner.ramp is not None:
            return self.pruner.ramp
        step = self.host.clock()
        return self._ramp(settings, step, step > self.window(settings)[0])

    def collapse_note(self) -> str | None:
        if self.active and self.settings.method == "movement":
            return (
                "movement pruning does not come back from this (its scores learn only from the task's gradient, "
                "which a collapsed model no longer has): magnitude and soft movement can"
            )
        return None

    def _switch_off(self) -> None:
        if self.pruner is None:
            return
        self.pruner.detach()
        self.pruner = None
        self.masks.clear()
        self.targets = []
        self._counts = None
        self.host.log("pruning switched off: masks removed, the weights under them are back")

    # -- training hooks ---------------------------------------------------------

    def before_step(self, step: int) -> None:
        if self.pruner is not None:
            self.pruner.before_step(step)

    def after_backward(self, step: int) -> None:
        if self.pruner is not None:
            self.pruner.after_backward(step)

    def after_optimizer_step(self, step: int) -> None:
        if self.pruner is not None:
            self.masks.reapply()
            self.pruner.after_optimizer_step(step)

    def after_step(self, step: int, loss: float, seconds: float, began: float) -> None:
        if self.pruner is not None:
            self.pruner.after_step(step, loss, seconds, began)

    def eval_due(self, step: int) -> bool:
        return self.pruner is not None and self.pruner.eval_due(step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.pruner is not None:
            self.pruner.on_eval(step, metrics)

    # -- what the console sees ---------------------------------------------------

    def pruned_counts(self) -> dict[str, int]:
        if self._counts is None or self._counts[0] != self.masks.version:
            self._counts = (self.masks.version, {n: self.masks.pruned(n) for n in self.targets})
        return self._counts[1]

    def sparsity(self) -> float:
        """Fraction of the target weights that are pruned now."""
        if not self.targets:
            return 0.0
        counts = self.pruned_counts()
        return sum(counts.values()) / sum(self.host.params[n].numel() for n in self.targets)

    def layout(self) -> dict[str, dict[str, float]]:
        """Per unit, the pruned fraction of each sublayer (q, k, v, o, ffn_in, ffn_out, other)."""
        acc: dict[str, dict[str, list[int]]] = {}
        for n, pruned in self.pruned_counts().items():
            unit = self.host.units.unit_of.get(n, "other")
            cell = acc.setdefault(unit, {}).setdefault(sublayer(n), [0, 0])
            cell[0] += pruned
            cell[1] += self.host.params[n].numel()
        return {u: {k: round(p / t, 5) for k, (p, t) in kinds.items()} for u, kinds in acc.items()}

    def stats(self, step: int) -> dict[str, Any]:
        if self.pruner is None:
            return {}
        target = self.pruner.target(step)
        info: dict[str, Any] = {
            "method": self.pruner.name,
            "sparsity": round(self.sparsity(), 5),
            "target": None if target is None else round(target, 5),
            **self.pruner.stats(),
        }
        if step % self.host.config.stats_every == 0 or self.masks.version != self._shown:
            info["layout"] = self.layout()
            info["units"] = self.unit_sparsity()  # the console's bars move at the step the masks did
            self._shown = self.masks.version
        return {"pruning": info}

    def unit_sparsity(self) -> dict[str, float]:
        """Per unit, the pruned fraction of all its parameters."""
        pruned: dict[str, int] = {}
        for n, count in self.pruned_counts().items():
            unit = self.host.units.unit_for(n)
            pruned[unit] = pruned.get(unit, 0) + count
        return {u.name: round(pruned.get(u.name, 0) / u.numel, 5) for u in self.host.units if u.numel}

    # -- checkpoints -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.pruner is None:
            return {}
        ramp = getattr(self.pruner, "ramp", None)
        return {
            "method": self.pruner.name,
            "ramp": ramp.state_dict() if ramp else None,
            "pruner": self.pruner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.pruner is None or state.get("method") != self.pruner.name:
            return
        if state.get("ramp") and isinstance(self.pruner, ScheduledPruner):
            self.pruner.ramp = Ramp(**state["ramp"])
        self.pruner.load_state_dict(state.get("pruner", {}))

    def mask_fingerprints(self) -> dict[str, tuple[list[float], bool]]:
        return self.masks.fingerprints()

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """Masks, the dense weights under them (for regrowth) and the pruner's own tensors."""
        out: dict[str, torch.Tensor] = {}
        for n in self.masks.masks:
            out[f"mask.{n}"] = self.masks.keep(n).cpu()
            out[f"latent.{n}"] = self.masks.dense(n).cpu()
        if self.pruner is not None:
            out.update(self.pruner.tensor_state())
        return {k: v.contiguous() for k, v in out.items()}

    @torch.no_grad()
    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.targets:
            if f"mask.{name}" in tensors:
                dense = tensors.get(f"latent.{name}", self.masks.param(name).detach())
                self.masks.load(name, dense, tensors[f"mask.{name}"])
        if self.pruner is not None:
            self.pruner.load_tensor_state(tensors)
