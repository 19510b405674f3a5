"""The policy runtime the engine and the own-loop controller share: the object methods see as their ``Host``.

It holds what both do alike: the model, the optimizer (None in a loop that passes none), the run settings, one
instance of every registered method, the sections in force (``current``), the timeline (pending entries applied
when due, triggers fired at their epoch or when an evaluation meets their condition, each firing recorded as a step
entry), the methods' parameter groups, the trainable mask (the freeze rules ANDed with every active method's gate,
functions of the policy, so a change can be previewed) and changes taken with rollback.  What differs between its
owners comes in explicitly: where messages go (``Reporter``), the step count (``clock``) and what the owner does
around a change (``RuntimeHooks``); the runtime never reaches back into them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from spu_engine.core.policy import Change, Policy, PolicyError, TimelineEntry, undo_change
from spu_engine.methods import method_classes
from spu_engine.methods.base import HostConfig
from spu_engine.model.loading import Units, count_params, find_units, stable_parameters
from spu_engine.runtime.memory_estimate import MemoryEstimate
from spu_engine.runtime.selection import backward_depth, check_policy_against_model, freeze_mask, lr_scales


class TimelineRefused(PolicyError):
    """A timeline entry the model refused at its step (validated at load, so the run would diverge from its policy)."""

    def __init__(self, entry: TimelineEntry, error: PolicyError) -> None:
        super().__init__(str(error))
        self.entry = entry


def metric_key(metrics: dict[str, Any], name: str) -> str | None:
    """The key of metric ``name`` in an evaluation's results, if it is a finite number there; HF Trainer prefixes its
    metrics with ``eval_`` (``eval_accuracy``), so ``accuracy`` finds that too."""
    for key in (name, f"eval_{name}"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return key
    return None


class Reporter(Protocol):
    """Where events and messages go: the engine's event stream, or the controller's list and Python logging."""

    def emit(self, type_: str, **fields: Any) -> Any: ...
    def log(self, message: str, level: str = "info") -> None: ...


def _nothing(*_args: Any) -> None:
    return None


def _no_teacher(*_args: Any) -> torch.nn.Module:
    raise PolicyError("this host keeps no teacher model")


@dataclass
class RuntimeHooks:
    """What the runtime's owner does around the runtime's work, one callable each (default: nothing).

    The engine records a change and regroups its optimizer; the own-loop controller refuses what a foreign
    optimizer cannot do and keeps the user's LR scheduler in step.  Mutable: an owner wires in what it builds on
    the runtime."""

    check: Callable[[Policy], None] = _nothing  # before the methods configure for a policy: PolicyError to refuse it
    configured: Callable[[], None] = _nothing  # the methods configured (optimizer groups may have come or gone)
    taken: Callable[[set[str] | None], None] = _nothing  # after a change: the names that trained before; None: refused
    applied: Callable[[Change, str, Policy, list[str]], None] = _nothing  # change, source, policy and names before it
    scheduled: Callable[[], None] = _nothing  # the pending entries or the triggers changed
    initial_model: Callable[[], torch.nn.Module] = _no_teacher  # distillation's default teacher
    load_teacher: Callable[[str], torch.nn.Module] = _no_teacher
    compile_notes: Callable[..., list[str]] = lambda *_: []  # the what-if's word on recompiling (loop.compiled)


class PolicyRuntime:
    """One model under one policy, as its methods' ``Host`` (``methods.base.Host``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        config: HostConfig,
        *,
        reporter: Reporter,
        clock: Callable[[], int],
        steps_per_epoch: int | None,
        hooks: RuntimeHooks | None = None,
    ) -> None:
        self.model, self.optimizer, self.config, self.reporter = model, optimizer, config, reporter
        self.clock = clock  # the owner's optimizer steps taken: the step a method configures at
        self.steps_per_epoch = steps_per_epoch  # None: the owner cannot say; epoch triggers are refused
        self.hooks = hooks or RuntimeHooks()
        self.refresh_parameters()
        self.loaded_names: list[str] = list(self.param_names)  # the names before any method added tensors
        self.methods: list = [m(self) for m in method_classes()]
        self.current = Policy()
        self.pending: list[TimelineEntry] = []  # timeline entries not applied yet, in step order
        self.triggers: list[TimelineEntry] = []  # at-epoch and when entries, fired or not, each with its firing steps
        self.metric_range: dict[str, list[float]] = {}  # eval metric -> [lowest, highest] over the evaluations so far
        self.memory = MemoryEstimate(self)  # what a policy costs in device memory, for the what-if

    def adopt(self, policy: Policy) -> None:
        """Take ``policy`` as the one in force and its timeline as this runtime's, checked against the model."""
        check_policy_against_model(policy, self.model, self.units, self.names_under)
        self.current = policy.sections()
        self.split_timeline(policy)

    def put_in_force(self) -> None:
        """The methods configured for the policy in force, and the trainable mask applied."""
        self.configure_methods(self.current)
        self.apply_trainable()

    def configure_methods(self, policy: Policy) -> None:
        """Every method's ``configure``, in ``configure_order``, at the owner's step (the owner may refuse first)."""
        self.hooks.check(policy)
        for m in self.configure_order(policy):
            m.configure(policy, self.clock())
        self.hooks.configured()

    def apply_change(self, change: Change, source: str) -> None:
        """Take ``change`` (``_take_change``; PolicyError leaves everything as it was) and let the owner record it."""
        before, names = self.current, self.param_names
        self._take_change(change)
        self.hooks.applied(change, source, before, names)

    def restore(self, policy: Policy) -> None:
        """Put ``policy``'s sections back in force, unrecorded: a change that ran out of memory is taken back as if
        never made (its owner drops the record of it)."""
        self._take_change(undo_change(policy, self.current))

    def schedule_changed(self) -> None:
        """The pending entries or the triggers changed (one applied or fired, one was added or removed)."""
        self.hooks.scheduled()

    def log(self, message: str, level: str = "info") -> None:
        self.reporter.log(message, level)

    def emit(self, type_: str, **fields: Any) -> Any:
        return self.reporter.emit(type_, **fields)

    def initial_model(self) -> torch.nn.Module:
        return self.hooks.initial_model()

    def load_teacher(self, source: str) -> torch.nn.Module:
        return self.hooks.load_teacher(source)

    def method(self, section: str):
        """The method object of a policy section (``selective_backprop``, ``pruning``, ...)."""
        return next((m for m in self.methods if m.section == section), None)

    # ------------------------------------------------------------------ timeline

    def split_timeline(self, policy: Policy) -> None:
        """The policy's timeline as this runtime keeps it: step entries pending, triggers apart."""
        self.pending = [e for e in policy.timeline if not e.is_trigger]
        self.triggers = [e for e in policy.timeline if e.is_trigger]
        self.metric_range = {}
        if self.steps_per_epoch is None and any(t.at is not None for t in self.triggers):
            raise PolicyError(
                "timeline: an 'at: {epoch: N}' trigger needs the epoch's length in steps: attach(..., steps_per_epoch=len(loader))"
            )

    def epoch_start(self, epoch: int) -> int:
        """The step at which epoch ``epoch`` (from 0) begins."""
        assert self.steps_per_epoch is not None
        return epoch * self.steps_per_epoch

    def apply_due(self, step: int) -> None:
        """Apply the pending timeline entries due at ``step``, in order, then the epoch triggers due.  An entry leaves
        ``pending`` once applied, so one the model refuses (TimelineRefused) stays pending: a checkpoint keeps it, a
        replay does not skip it."""
        due = [e for e in self.pending if e.step is not None and e.step <= step]
        for entry in due:
            try:
                self.apply_change(Change(freeze=entry.freeze, set=entry.set), source="timeline")
            except PolicyError as exc:
                raise TimelineRefused(entry, exc) from exc
            self.pending.remove(entry)
        fired = [
            t for t in self.triggers if t.at is not None and not t.fired and self.epoch_start(t.at.epoch or 0) <= step
        ]
        for trigger in fired:
            self._fire(trigger, step)
        if due or fired:
            self.schedule_changed()

    def on_evaluation(self, step: int, metrics: dict[str, Any]) -> None:
        """A scheduled evaluation after ``step`` steps: fire the when-triggers whose condition holds (compared with the
        earlier evaluations' best), then count these values in."""
        fired = False
        for trigger in list(self.triggers):
            if trigger.when is None or not trigger.checked_at(step):
                continue
            key = metric_key(metrics, trigger.when.metric)
            if key is None:
                continue
            lowest, highest = self.metric_range.get(key, (None, None))
            if trigger.when.holds(float(metrics[key]), lowest, highest):
                self._fire(trigger, step)
                fired = True
        for name in metrics:
            if metric_key(metrics, name) == name:
                value = float(metrics[name])
                low, high = self.metric_range.get(name, (value, value))
                self.metric_range[name] = [min(low, value), max(high, value)]
        if fired:
            self.schedule_changed()

    def _fire(self, trigger: TimelineEntry, step: int) -> None:
        """Apply a trigger's change (recorded as a step entry, as every change is) and note the step it fired at."""
        try:
            self.apply_change(Change(freeze=trigger.freeze, set=trigger.set), source="trigger")
        except PolicyError as exc:
            raise TimelineRefused(trigger, exc) from exc
        self.log(f"trigger {trigger.moment()} fired at step {step}")
        self.triggers[self.triggers.index(trigger)] = trigger.model_copy(update={"fired": [*trigger.fired, step]})

    # ------------------------------------------------------------------ parameter groups

    def add_parameters(
        self, params: list[torch.nn.Parameter], lr: float | None = None, weight_decay: float = 0.0, name: str = "extra"
    ) -> None:
        """Methods that add tensors (adapters, LoRA, scores) train them as an optimizer group of their own."""
        if self.optimizer is None:
            raise PolicyError(
                f"{name}: this policy adds trainable tensors; pass your optimizer to attach(policy, model, optimizer)"
            )
        lr = lr or self.config.lr
        self.optimizer.add_param_group(
            {"params": params, "lr": lr, "base_lr": lr, "weight_decay": weight_decay, "name": name}
        )
        self.refresh_parameters()

    def remove_parameters(self, name: str) -> None:
        """Drop the groups ``name`` and their optimizer state: the method took its tensors out again."""
        if self.optimizer is not None:
            for group in [g for g in self.optimizer.param_groups if g.get("name") == name]:
                self.forget_optimizer_state(group["params"])
                self.optimizer.param_groups.remove(group)
        self.refresh_parameters()

    def set_group_lr(self, name: str, lr: float | None) -> None:
        """The learning rate of the groups ``name`` (None: the run's), before the schedule's factor."""
        for group in self.optimizer.param_groups if self.optimizer is not None else []:
            if group.get("name") == name:
                group["base_lr"] = lr or self.config.lr

    def lr_multipliers(self, policy: Policy | None = None) -> dict[str, float]:
        """Stable name -> learning-rate multiplier under ``policy`` (default: the one in force): the ``lr`` section's
        decay and scale rules, times the factors the methods put on their tensors (LoRA+'s on LoRA's B factors)."""
        policy = policy or self.current
        scales = lr_scales(policy.lr, self.param_names, self.units)
        for m in self.methods:
            for n, factor in m.lr_multipliers(policy, list(scales)).items():
                scales[n] *= factor
        return scales

    def optimizer_state(self, param: torch.nn.Parameter) -> dict[str, Any]:
        """The optimizer's state of ``param``, live (movement puts back the moments of pruned entries)."""
        return self.optimizer.state.get(param, {}) if self.optimizer is not None else {}

    def forget_optimizer_state(self, params: list[torch.nn.Parameter]) -> None:
        """These tensors start afresh in the optimizer (zero moments)."""
        if self.optimizer is not None:
            for p in params:
                self.optimizer.state.pop(p, None)

    # ------------------------------------------------------------------ what trains

    def configure_order(self, policy: Policy) -> list:
        """The methods, those that ``policy`` switches off first: a method that must go (or refuses to, having
        trained) does so before another adds its tensors, so a refused switch never leaves two half-installed."""
        leaving = [m for m in self.methods if m.leaves_under(policy)]
        return leaving + [m for m in self.methods if m not in leaving]

    def names_under(self, policy: Policy) -> list[str]:
        """Parameter names (stable) the model has under ``policy``: as loaded, plus what its methods add."""
        added: dict[str, int] = {}
        for m in self.methods:
            added.update(m.added_under(policy))
        return [*self.loaded_names, *added]

    def refresh_parameters(self) -> None:
        """Re-read the model's parameters and units after a method changed the module tree."""
        self.units: Units = find_units(self.model)
        self.params: dict[str, torch.nn.Parameter] = stable_parameters(self.model)  # by stable name (model.stable_name)
        self.param_names = list(self.params)  # as loaded, whatever PEFT wrapped since

    def trainable_count(self) -> int:
        return count_params(self.model, trainable=True)

    def trainable_mask(self, policy: Policy | None = None, names: list[str] | None = None) -> dict[str, bool]:
        """name -> trains, under ``policy`` (default: the one in force) for ``names`` (default: the model's now)."""
        policy = policy or self.current
        mask = freeze_mask(policy.freeze, names if names is not None else self.param_names, self.units)
        for m in self.methods:
            gate = m.gate_under(policy)
            if gate is not None:
                for n, trains in mask.items():
                    if trains and not gate(n):
                        mask[n] = False
        return mask

    def preview(self, change: Change) -> dict[str, Any]:
        """What ``change`` would do, without doing it (the console shows this before a change is applied).

        Trainable parameters and their share, with the tensors a method would add; an estimate of the backward
        compute kept: the blocks from the first trainable one to the end (a frozen prefix needs no backward) times
        the share of samples the methods keep; the pruning target, which saves no compute with dense kernels;
        each method's notes on what a setting does that its name does not say; and the device memory a step would
        hold before and after (``memory_estimate``).
        """
        new = self.current.apply(change)  # PolicyError, naming the key, for a value the policy does not allow
        names = self.names_under(new)
        sizes = {n: p.numel() for n, p in self.params.items()}
        for m in self.methods:
            sizes.update(m.added_under(new))
        mask = self.trainable_mask(new, names)
        trainable = sum(sizes.get(n, 0) for n, trains in mask.items() if trains)
        total = sum(sizes.get(n, 0) for n in names)
        depth, keep = backward_depth(mask, self.units), self.backward_keep(new)
        notes = [note for m in self.methods for note in m.preview_notes(self.current, new)]
        notes += self.hooks.compile_notes(names, sizes, mask, new)
        if trainable == 0:
            notes.append(
                "nothing would train: the freeze rules and the methods together leave no parameter (steps would change nothing)"
            )
        multipliers_move = self.lr_multipliers(new) != self.lr_multipliers()  # a method's factor changed (LoRA+)
        if new.lr != self.current.lr or multipliers_move or new.lr.decay != 1.0 or new.lr.scale:
            notes.append("lr multipliers: " + self._describe_multipliers(new))
        if new.lr.warm_in:
            notes.append(
                f"warm-in: a tensor that starts training from now on ramps its lr in over {new.lr.warm_in} steps"
            )
        sparsity = next((s for m in self.methods if (s := m.target_sparsity(new)) is not None), None)
        return {
            "trainable": trainable,
            "total": total,
            "trainable_now": self.trainable_count(),
            "backward": None if keep is None else round(depth * keep, 4),
            "frozen_prefix_backward": round(depth, 4),
            "sparsity": sparsity,
            "notes": notes,
            "memory": self.memory.what_if(self.current, new),
        }

    def backward_keep(self, policy: Policy) -> float | None:
        """The share of the samples that get a backward under ``policy``; None: it depends on the losses."""
        shares = [m.backward_share(policy) for m in self.methods]
        return None if None in shares else math.prod(shares)

    def _describe_multipliers(self, policy: Policy) -> str:
        """Each unit's lr multiplier under ``policy`` ('0.5-1' where its tensors differ), in model order."""
        scales = self.lr_multipliers(policy)
        by_unit: dict[str, list[float]] = {}
        for n, scale in scales.items():
            by_unit.setdefault(self.units.unit_for(n), []).append(scale)
        return ", ".join(
            f"{u} x{min(v):.3g}" + (f"-{max(v):.3g}" if max(v) != min(v) else "") for u, v in by_unit.items()
        )

    def apply_trainable(self) -> None:
        """Frozen tensors get requires_grad False and lose their gradient (so no optimizer update)."""
        for n, trainable in self.trainable_mask().items():
            p = self.params[n]
            p.requires_grad_(trainable)
            if not trainable:
                p.grad = None

    def _take_change(self, change: Change) -> None:
        """Put ``change`` in force; on PolicyError (or any refusal) everything stays as it was.  The owner hears of it
        either way (``hooks.taken``: the engine's warm-in and optimizer groups follow)."""
        before: set[str] | None = {n for n, p in self.params.items() if p.requires_grad}
        try:
            new = self.current.apply(change)
            old = self.current
            try:
                self.configure_methods(new)
                check_policy_against_model(new, self.model, self.units)  # the names the methods left (PEFT adds some)
            except Exception:
                self.configure_methods(old)
                raise
            self.current = new
            self.apply_trainable()
        except BaseException:
            before = None
            raise
        finally:
            self.hooks.taken(before)
