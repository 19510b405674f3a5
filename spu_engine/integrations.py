"""Run an exported policy in your own training script: a plain PyTorch loop or a Hugging Face Trainer.

    ctl = attach(policy, model, optimizer, scheduler=scheduler)   # plain PyTorch
    for step, batch in enumerate(loader):
        ctl.step(step)                             # timeline entries due at `step`, before the forward
        loss = ctl.backward(batch, loss_fn)        # selective backprop if the policy asks for it
        optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)

    trainer = Trainer(..., callbacks=[SPUCallback(policy)])   # Hugging Face

The controller applies the policy exactly as the engine does: freeze rules through
the same unit resolution (a frozen tensor gets ``requires_grad=False`` and no
``.grad``), a timeline entry with step ``s`` in force for the optimizer step that
takes the count from ``s`` to ``s + 1``, and the engine's own method objects
(pruning schedules, BitFit, adapters, LoRA / IA3, weight-update skipping, the
selective-backprop rule) on a policy runtime of its own, the same class as the
engine's (``runtime.PolicyRuntime``, the methods' ``Host``).  Their
``after_backward`` / ``after_optimizer_step`` hooks run from optimizer hooks,
so the loop needs no other call than ``ctl.step``.

What a foreign loop cannot give: the engine draws extra batches to fill a
backward batch in selective backprop's percentile mode; here each batch keeps
its own selected samples.  Hugging Face's Trainer computes one mean loss inside
``training_step``, so SPUCallback cannot skip samples; selective backprop there
needs ``controller.selective_loss`` returned from an overridden ``compute_loss``
(examples/hf_trainer.py).
Tensors a method adds (LoRA, adapters, movement scores) join the optimizer as
their own parameter group; pass the LR scheduler to ``attach`` (SPUCallback
takes the Trainer's) so those groups follow its schedule, as in the engine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spu_engine.core.policy import Change, LearningRates, Policy, PolicyError
from spu_engine.loop.forwarding import forwards
from spu_engine.runtime.policy_runtime import PolicyRuntime, RuntimeHooks

log = logging.getLogger("spu_engine.integrations")

LossFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class LoopConfig:
    """The run settings the methods read (``methods.base.HostConfig``), as the engine's config has them."""

    steps: int | None = None  # total optimizer steps; None when the loop does not say
    lr: float = 5e-5
    seed: int = 0
    batch_size: int = 32
    stats_every: int = 10


NO_TEACHER_HERE = (
    "your loop computes its own loss, so the policy cannot mix in a teacher's; "
    "train with `spu train`, or add the teacher's term to your loss and leave this section off"
)


@forwards(runtime="methods method units params param_names current pending triggers trainable_count apply_change")
class PolicyController:
    """An exported policy applied to a model and optimizer you drive yourself, through a ``PolicyRuntime`` (``runtime``,
    its methods' host) whose step is this loop's ``step_count``."""

    def __init__(
        self,
        model: nn.Module,
        policy: Policy,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        steps: int | None = None,
        seed: int = 0,
        steps_per_epoch: int | None = None,
    ) -> None:
        self.model = model
        self.optimizer = _unwrap(optimizer)
        self.scheduler = _unwrap(scheduler, torch.optim.lr_scheduler.LRScheduler, "scheduler")
        self._group_lambdas = (
            {id(g): f for g, f in zip(self.optimizer.param_groups, getattr(self.scheduler, "lr_lambdas", []))}
            if self.scheduler
            else {}
        )
        first = self.optimizer.param_groups[0] if self.optimizer is not None else {}
        lr = first.get("initial_lr", first.get("lr", LoopConfig.lr))  # a scheduler keeps the unscaled lr in initial_lr
        self.config = LoopConfig(steps=steps or None, lr=lr, seed=seed)
        self.step_count = 0
        self.history: list[dict[str, Any]] = []  # one entry per applied change: step, source, trainable count
        self.events: list[dict[str, Any]] = []  # what the methods report (prune rounds, phase switches)
        hooks = RuntimeHooks(
            check=self._refuse_lr_sections,
            configured=self._sync_scheduler,
            applied=self._applied,
            initial_model=_no_teacher,
            load_teacher=_no_teacher,
        )
        self.runtime = PolicyRuntime(
            model,
            self.optimizer,
            self.config,
            reporter=self,
            clock=lambda: self.step_count,
            steps_per_epoch=steps_per_epoch,
            hooks=hooks,
        )
        self._check_optimizer()
        self.runtime.adopt(policy)
        self.runtime.put_in_force()
        self._hooks = []
        if self.optimizer is not None:
            self._hooks = [
                self.optimizer.register_step_pre_hook(lambda *_: self._gradients_ready()),
                self.optimizer.register_step_post_hook(lambda *_: self._after_optimizer_step()),
            ]

    # ------------------------------------------------------------------ the per-step call

    def step(self, step: int | None = None) -> None:
        """Start optimizer step ``step`` (default: one after the last): apply the timeline entries due, then the methods' step hooks.

        An entry the model refuses raises ``runtime.TimelineRefused`` (a PolicyError) and stays pending.
        """
        if step is not None:
            self.step_count = step
        self.runtime.apply_due(self.step_count)
        self._each("before_step", self.step_count)

    def backward(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> torch.Tensor:
        """Backward on the samples the policy keeps; returns the mean loss of the whole batch (detached)."""
        loss, batch_mean = self._selected_loss(batch, loss_fn)
        loss.backward()
        return batch_mean

    def selective_loss(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> torch.Tensor:
        """The loss to backpropagate: the mean over the samples the policy keeps (for a Trainer's compute_loss)."""
        return self._selected_loss(batch, loss_fn)[0]

    def _selected_loss(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
        """``loss_fn(batch)`` gives per-sample losses [B] (``per_sample_loss`` below does it for classification,
        QA and LM batches).  With selective backprop on, the batch is scored without a graph and only the
        kept samples get a second, grad-enabled forward; with none kept the loss is a graph-less zero."""
        select = next((f for m in self.methods if (f := m.sample_selector()) is not None), None)
        if select is None:
            loss = loss_fn(batch)
            return loss.mean(), loss.detach().mean()
        with torch.no_grad():
            scores = loss_fn(batch).detach().float()
        keep = select(scores.cpu()).nonzero().flatten().tolist()  # the engine's selection rule and its random stream
        if not keep:
            return torch.zeros((), device=scores.device, requires_grad=True), scores.mean()
        rows = torch.tensor(keep)
        return loss_fn({k: v[rows.to(v.device)] for k, v in batch.items()}).mean(), scores.mean()

    def on_eval(self, metrics: dict[str, float]) -> None:
        """Report an evaluation (weight-update skipping switches phase on eval loss; when-triggers fire on it)."""
        self._each("on_eval", self.step_count, metrics)
        self.runtime.on_evaluation(self.step_count, metrics)

    def detach(self) -> None:
        """Remove the optimizer hooks (the model keeps its current trainable state)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ what the runtime hears from this loop

    def _applied(self, _change: Change, source: str, _before: Policy, _names: list[str]) -> None:
        self.history.append({"step": self.step_count, "source": source, "trainable": self.runtime.trainable_count()})

    def log(self, message: str, level: str = "info") -> None:
        log.log(getattr(logging, level.upper(), logging.INFO), message)

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": type_, **fields}
        self.events.append(ev)
        return ev

    # ------------------------------------------------------------------ internals

    def _refuse_lr_sections(self, policy: Policy) -> None:
        """Per-unit learning rates regroup the optimizer, which is the user's here."""
        keys = (
            ["lr"] if policy.lr != LearningRates() else [k for m in self.runtime.methods if (k := m.lr_setting(policy))]
        )
        if keys:
            raise PolicyError(
                f"{keys[0]}: per-unit learning rates need the engine's optimizer groups (spu train); in your own "
                "loop give your optimizer's param groups their lr, and leave this section out"
            )

    def _sync_scheduler(self) -> None:
        """Parameter groups a method added or removed join or leave the LR schedule (as in the engine, where
        every group follows the same warmup/decay factor): a new group takes the first group's factor."""
        s = self.scheduler
        if s is None:
            return
        groups = self.optimizer.param_groups
        factor = s.get_last_lr()[0] / s.base_lrs[0] if s.base_lrs[0] else 1.0
        for g in groups:
            if "initial_lr" not in g:
                g["initial_lr"] = g["lr"]
                g["lr"] = g["initial_lr"] * factor
        s.base_lrs = [g["initial_lr"] for g in groups]
        s._last_lr = [g["lr"] for g in groups]
        if hasattr(s, "lr_lambdas"):
            first = s.lr_lambdas[0]
            s.lr_lambdas = [self._group_lambdas.setdefault(id(g), first) for g in groups]

    def _each(self, hook: str, *args: Any) -> None:
        for m in self.methods:
            getattr(m, hook)(*args)

    def _gradients_ready(self) -> None:
        """The optimizer is about to step: the loop's gradients are final (the loop clipped or reduced them already)."""
        self._each("after_backward", self.step_count)
        self._each("on_gradients", self.step_count)

    def _after_optimizer_step(self) -> None:
        """Method hooks, and cleared grads for optimizer tensors outside the model (movement scores), which a
        loop's ``model.zero_grad()`` (Trainer's) never reaches and which would otherwise accumulate."""
        in_model = {id(p) for p in self.runtime.params.values()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in in_model:
                    p.grad = None
        self._each("after_update", self.step_count)
        self._each("after_optimizer_step", self.step_count)
        self.step_count += 1

    def _check_optimizer(self) -> None:
        """A tensor the timeline unfreezes later must already be in the optimizer, or it would never learn."""
        if self.optimizer is None:
            return
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in self.runtime.params.items() if id(p) not in held]
        if missing:
            raise PolicyError(
                f"the optimizer does not hold {len(missing)} parameters of the model "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                "build it over all parameters (the policy decides which of them train) before attach()"
            )


def attach(
    policy: Policy,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    steps_per_epoch: int | None = None,
) -> PolicyController:
    """Apply ``policy`` in your own loop: call ``ctl.step(step)`` at each step's start, ``ctl.on_eval(metrics)`` after
    an evaluation.

    Pass the optimizer (over all parameters: the policy decides which train) when the policy adds tensors, the LR
    scheduler so those follow it, ``steps`` (the run's length) when pruning should know whether it can finish
    (movement's warm-up and final hold are fractions of it), ``steps_per_epoch`` for ``at: {epoch: N}`` triggers.
    """
    return PolicyController(
        model, policy, optimizer, scheduler, steps=steps, seed=seed, steps_per_epoch=steps_per_epoch
    )


def _no_teacher(*_args: Any) -> nn.Module:
    raise PolicyError(NO_TEACHER_HERE)


def _unwrap(obj, kind=torch.optim.Optimizer, attribute: str = "optimizer"):
    """The torch optimizer (or LR scheduler) inside accelerate's AcceleratedOptimizer (AcceleratedScheduler)."""
    while isinstance(getattr(obj, attribute, None), kind):
        obj = getattr(obj, attribute)
    return obj


def per_sample_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample loss [B] of a classification, QA (start/end positions) or causal-LM (token labels) batch."""
    from spu_engine.tasks import ClassificationTask, LMTask, QATask

    if "start_positions" in batch:
        kind = QATask
    elif "labels" in batch and batch["labels"].dim() == 2:
        kind = LMTask
    elif "labels" in batch:
        kind = ClassificationTask
    else:
        raise ValueError(
            f"cannot tell the task of a batch with keys {', '.join(batch)}: need labels or start_positions/end_positions"
        )
    return kind.per_sample_loss(kind.__new__(kind), model, batch)  # these losses read nothing from the task's data


# --------------------------------------------------------------------------- Hugging Face Trainer

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object  # type: ignore[misc,assignment]


class SPUCallback(TrainerCallback):
    """Apply an exported SPU policy inside ``transformers.Trainer`` (freeze timeline, methods, pruning)."""

    def __init__(self, policy: Policy | str | os.PathLike, *, seed: int = 0) -> None:
        from spu_engine.core.policy_files import load_policy

        self.policy = policy if isinstance(policy, Policy) else load_policy(policy)
        self.seed = seed
        self.controller: PolicyController | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        scheduler = kwargs.get("lr_scheduler")
        loader = kwargs.get("train_dataloader")
        # the Trainer's own count: optimizer steps per pass over the loader
        per_epoch = (
            max(1, len(loader) // args.gradient_accumulation_steps)
            if loader is not None and hasattr(loader, "__len__")
            else None
        )
        self.controller = PolicyController(
            model,
            self.policy,
            optimizer,
            scheduler,
            steps=state.max_steps or None,
            seed=self.seed,
            steps_per_epoch=per_epoch,
        )
        for m in self.controller.methods:
            missed = m.own_loss_warning(self.policy)
            if missed is not None:
                log.warning("SPUCallback: Trainer backpropagates its own mean loss; " + missed)

    def on_step_begin(self, args, state, control, **kwargs):
        self.controller.step(state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.controller is not None and metrics:
            self.controller.on_eval(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.detach()
