"""One training step and one evaluation, computed: what the engine runs between two boundaries.

``Trainer`` is the engine's arithmetic, a component on the policy runtime
(``runtime.PolicyRuntime``: model, optimizer, methods, what trains) that names
in its constructor whatever else it uses: batches drawn from the data stream
(the same global batch on every rank, each rank its share), the per-sample loss
selective backprop needs, backward with the AMP scaler, the warm-up and linear
decay of the learning rate, clipping, the optimizer step, and the ``step`` and
``units`` events.  Methods hook in at fixed points (``before_step``,
``after_backward``, ``on_gradients``, ``after_optimizer_step``); a method whose
``forward_backward`` gives one (selective backprop) replaces the plain one, with
the trainer as its ``methods.base.TrainingLoop``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from spu_engine.core.collapse import MIN_SAMPLES, is_collapsed, top_answer_share
from spu_engine.core.config import EngineConfig
from spu_engine.loop.batching import BatchStream
from spu_engine.loop.distributed import Distributed
from spu_engine.loop.faults import free_memory, is_out_of_memory, oom_advice
from spu_engine.loop.lifecycle import Stop
from spu_engine.loop.lr_groups import LrGroups, group_lr_scale
from spu_engine.loop.micro_batches import micro_batch_size, micro_batches
from spu_engine.loop.nonfinite import NonfiniteSteps
from spu_engine.loop.step_readout import HeldStep, StepReadout, check_gradients, hold
from spu_engine.loop.system_metrics import SystemSampler
from spu_engine.model.checkpointing import Checkpointing
from spu_engine.runtime.policy_runtime import PolicyRuntime, Reporter
from spu_engine.runtime.unit_stats import after_update, before_update
from spu_engine.tasks import Task


@dataclass
class Progress:
    """Optimizer steps taken: the one count the engine's components read, moved on by the trainer alone."""

    step: int = 0

    def now(self) -> int:
        return self.step


class RunSignals(Protocol):
    """What a step or an evaluation asks of the run's control (``lifecycle.RunControl``)."""

    stop: Stop | None
    stop_signal: str | None  # a stop signal arrived: an evaluation is abandoned

    def pause(self, message: str = "") -> None: ...
    def save_or_pause(self) -> None: ...


class Trainer:
    """The step and evaluation arithmetic of ``Engine``, and what it does when a batch or an evaluation fails; the
    ``methods.base.TrainingLoop`` of a method that replaces the forward and backward pass."""

    compiled: Any = None  # --compile: the model's compiles, said after each step and evaluation (loop.compiled)

    def __init__(
        self,
        config: EngineConfig,
        runtime: PolicyRuntime,
        groups: LrGroups,
        task: Task,
        stream: BatchStream,
        *,
        progress: Progress,
        reporter: Reporter,
        control: RunSignals,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        scaler: Any,
        dist: Distributed | None,
        system: SystemSampler | None,
        run_dir: Path | None,
        rolled_back: Callable[[str], bool] = lambda _detail: False,  # a console change just made, taken back
    ) -> None:
        self.config, self.runtime, self.groups, self.task, self.stream = config, runtime, groups, task, stream
        self.progress, self.reporter, self.control = progress, reporter, control
        self.device, self.amp_dtype, self.scaler = device, amp_dtype, scaler
        self.dist, self.system, self.run_dir, self.rolled_back = dist, system, run_dir, rolled_back
        self.model = runtime.model
        self.optimizer: torch.optim.Optimizer = runtime.optimizer
        self.methods = runtime.methods
        self.samples_seen = 0
        self.evaluated_at: int | None = None  # the step of the last finished evaluation
        self.collapsed = False  # the last evaluation gave (nearly) every example one answer
        self.nonfinite = NonfiniteSteps(runtime, reporter, control)
        self.checkpointing = Checkpointing(self.model)
        self._step_time_ema: float | None = None
        self.readout = StepReadout(self._publish)
        self.published: dict[str, Any] = {}  # the fields of the last step event sent

    @property
    def step(self) -> int:
        return self.progress.step

    @step.setter
    def step(self, value: int) -> None:
        self.progress.step = value

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        return self.runtime.params

    @property
    def units(self):
        return self.runtime.units

    @property
    def current(self):
        return self.runtime.current

    def emit(self, type_: str, **fields: Any) -> Any:
        return self.reporter.emit(type_, **fields)

    def log(self, message: str, level: str = "info") -> None:
        self.reporter.log(message, level)

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def next_batch(self, n: int | None = None) -> dict[str, torch.Tensor]:
        """``n`` examples per rank, collated: ranks draw the same global batch and each takes its share."""
        return self.batch_of(self._draw(n or self.config.batch_size))

    def _draw(self, n: int) -> list[int]:
        """This rank's share of the next global batch of ``n`` examples per rank."""
        if self.dist is None:
            return self.stream.take(n)
        return self.dist.shard(self.stream.take(n * self.dist.world_size))

    def batch_of(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """These training examples, collated (padded to their longest) and on the device; a batch that trains (its
        forward builds a graph, not selective backprop's scoring) is counted for the system event."""
        features = [self.task.train[i] for i in indices]
        if self.system is not None and torch.is_grad_enabled():
            self.system.count(features)
        return self._to_device(self.task.collate(features))

    def per_sample_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss training minimises: the task's, or what a method makes of it (distillation mixes in a KL)."""
        with self._autocast():
            for m in self.methods:
                loss = m.per_sample_loss(self, batch) if m.active else None
                if loss is not None:
                    return loss
            return self.task.per_sample_loss(self.model, batch)

    def backward(self, loss: torch.Tensor) -> None:
        if (
            not loss.requires_grad
        ):  # nothing trains (e.g. bias-only skipping with LoRA on a model whose head has no bias)
            return
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _lr_factor(self, step: int) -> float:
        warm = self.config.warmup_steps()
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (self.config.steps - step) / max(1, self.config.steps - warm))

    def _forward_backward(self) -> tuple[torch.Tensor, int, dict[str, Any]]:
        """Loss (detached), samples consumed, extra stats.  Selective backprop replaces this."""
        for m in self.methods:
            done = m.forward_backward(self) if m.active else None
            if done is not None:
                return done
        n = self.config.batch_size
        if self.current.memory.grad_accum == 1:
            loss = self.per_sample_loss(self.next_batch()).mean()
            self.backward(loss)
            return loss.detach(), n, {}
        mine = self._draw(n)
        return self.train_on(mine, len(mine)) / len(mine), n, {}

    def train_on(self, indices: list[int], of: float) -> torch.Tensor:
        """Forward and backward of these examples in the policy's micro-batches, each adding its share of a mean over
        ``of`` examples to the gradients; their summed loss (detached).  On many ranks every rank runs as many passes
        as the rank with the largest share (``ceil(of)`` examples; sharded weights are gathered by all ranks at
        once): a rank with fewer examples adds passes that count nothing."""
        grad_accum = self.current.memory.grad_accum
        parts = list(micro_batches(indices, grad_accum))
        if self.dist is not None:
            passes = len(list(micro_batches(list(range(math.ceil(of))), grad_accum)))
            parts += [[]] * (passes - len(parts))
        total = torch.zeros((), device=self.device)
        for part in parts:
            loss = self.per_sample_loss(self.batch_of(part or [0]))
            if not part:  # a pass that keeps the ranks in step: its gradients are zeros
                self.backward(loss.sum() * 0.0)
                continue
            self.backward(loss.sum() / of)
            total = total + loss.detach().sum()
        return total

    @torch.no_grad()
    def losses_of(self, indices: list[int]) -> torch.Tensor:
        """Per-sample losses of these examples, no graph, in the policy's micro-batches (selective backprop scores)."""
        parts = micro_batches(indices, self.current.memory.grad_accum)
        return torch.cat([self.per_sample_loss(self.batch_of(part)).detach().float() for part in parts])

    def train_step(self, settled: bool = True) -> dict[str, Any]:
        """One optimizer step.  ``settled``: its event is out and the fields it returns hold its loss (a host sync);
        the run's own loop passes False, and the event follows at the next step with no wait (``step_readout``)."""
        t0 = time.perf_counter()
        step = self.step
        memory = self.current.memory
        if self.checkpointing.follow(memory.gradient_checkpointing):
            self.log(f"step {step}: gradient checkpointing {'on' if memory.gradient_checkpointing else 'off'}")
        for m in self.methods:
            m.before_step(step)
        self.groups.end_ramps(step)
        factor, warm_in = self._lr_factor(step), self.current.lr.warm_in
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor * group_lr_scale(g, step, warm_in)
        stats_due = (step + 1) % self.config.stats_every == 0
        with self.runtime.memory.measuring(step + 1, due=stats_due):  # the activations the what-if scales
            loss, n_samples, extra = self._forward_backward()
        for m in self.methods:
            m.after_backward(step)
        if self.dist is not None:  # FSDP2 averaged the gradients during backward; the loss is averaged here
            loss = self.dist.mean(loss)
            n_samples *= self.dist.world_size
        named = [(n, p) for n, p in self.params.items() if p.grad is not None]  # model order; no module walk
        if self.scaler and named:
            self.scaler.unscale_(self.optimizer)
        check = check_gradients(
            loss, named, self.config.grad_clip, self.config.grad_clip > 0, self.dist and self.dist.sum_over_shards
        )
        for m in self.methods:
            m.on_gradients(step)
        before = before_update(self.units, self.params) if stats_due else None
        if named:  # with no gradient at all (selective backprop kept no sample) no parameter moves
            self._optimizer_step(check.found_inf)
        for m in self.methods:
            m.after_update(step)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += n_samples
        for m in self.methods:
            m.after_optimizer_step(step)
        dt = time.perf_counter() - t0
        self._step_time_ema = dt if self._step_time_ema is None else 0.9 * self._step_time_ema + 0.1 * dt
        fields = dict(
            step=self.step,
            lr=self.optimizer.param_groups[0]["lr"],
            step_time=round(dt, 5),
            samples_per_s=round(
                self.config.batch_size * (self.dist.world_size if self.dist else 1) / self._step_time_ema, 2
            ),
            samples=self.samples_seen,
            batch_size=self.config.batch_size,
            micro_batch=micro_batch_size(self.config.batch_size, memory.grad_accum),
            trainable=sum(p.numel() for p in self.params.values() if p.requires_grad),  # no module walk
            **extra,
        )
        for m in self.methods:
            fields.update(m.stats(self.step))
        if self.compiled is not None:
            fields.update(self.compiled.stepped(self.step))
        self.readout.hold(hold(fields, t0, dt, check))  # the step before goes out now: its values are on the host
        if before is not None:
            self.emit("units", step=self.step, **after_update(self.units, self.params, before))
        if not settled:
            return fields
        self.readout.settle()
        return self.published

    def _optimizer_step(self, found_inf: torch.Tensor) -> None:
        """Step, skipping the update on the device when ``found_inf`` (fused AdamW reads it, as under AMP's scaler);
        an optimizer that cannot (one restored from an old checkpoint) asks the host instead."""
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif all(g.get("fused") for g in self.optimizer.param_groups):
            self.optimizer.found_inf = found_inf
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not found_inf.item():
            self.optimizer.step()

    def _publish(self, held: HeldStep) -> None:
        """A held step's event, now that its loss and gradient norm are on the host; a skipped one says why."""
        loss, grad_norm, skipped = held.values()
        step = held.fields["step"]
        fields = {**held.fields, "loss": None if skipped else round(loss, 6)}
        if grad_norm is not None:
            fields["grad_norm"] = None if skipped else round(grad_norm, 6)
        if skipped and not self.scaler:
            fields["skipped"] = True
        self.emit("step", **fields)
        self.published = fields
        if not skipped:
            self.nonfinite.finite()
            for m in self.methods:
                m.after_step(step, loss, held.seconds, held.began)
        elif not self.scaler:  # under AMP's scaler a skipped step is the scaler's business, not a fault
            self.nonfinite.skipped(step, loss, self.readout.non_finite_names(held))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.readout.settle()  # the last step's loss reaches the methods (an IMP round's tally) before they see metrics
        was_training = self.model.training
        self.model.eval()
        bs = self.config.eval_batch_size
        feats = self.task.eval

        def batches():
            for i in range(0, len(feats), bs):
                if self.control.stop_signal:  # SIGTERM: the checkpoint must not wait for a long evaluation
                    raise EvaluationInterrupted
                yield self._to_device(self.task.collate(feats[i : i + bs]))

        try:
            with self._autocast():
                metrics = self.task.evaluate(self.model, batches())
        except EvaluationInterrupted:
            self.log(f"{self.control.stop_signal}: evaluation at step {self.step} abandoned", "warning")
            return {}
        finally:
            self.model.train(was_training)
        self.evaluated_at = self.step
        if self.compiled is not None:
            self.compiled.looked(self.step, "evaluation")
        for m in self.methods:
            m.on_eval(self.step, metrics)
        self.emit("eval", step=self.step, **metrics)
        for line in self.task.shown():
            self.emit("log", step=self.step, level="info", message=line, about="generation")
        self._say_if_collapsed(metrics)
        return metrics

    def _say_if_collapsed(self, metrics: dict[str, float]) -> None:
        """A classifier that gives (nearly) every evaluated example the same answer has stopped using its input:
        said when it happens and when it ends, since an accuracy equal to one class's share looks like learning."""
        found = top_answer_share(metrics)
        if found is None or found[1] < MIN_SAMPLES:
            return
        (share, n), collapsed = found, is_collapsed(metrics)
        if collapsed and not self.collapsed:
            said = "".join(f"; {note}" for m in self.methods if (note := m.collapse_note()) is not None)
            self.log(
                f"step {self.step}: {round(share * n)} of the {n} evaluated examples got the same answer; the model has collapsed "
                f"to one class (its accuracy {metrics['accuracy']:.4f} is that class's share)" + said,
                "warning",
            )
        elif self.collapsed and not collapsed:
            self.log(
                f"step {self.step}: the model answers by its input again (the most common answer {100 * share:.1f} % of {n})"
            )
        self.collapsed = collapsed

    def eval_due(self) -> bool:
        """Every ``eval_every`` steps, and when a method asks (IMP at each round's end)."""
        every = self.config.eval_every
        return bool(every and self.step % every == 0) or any(m.eval_due(self.step) for m in self.methods)

    def survive_oom(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn``; on out-of-memory free what the attempt held and pause instead of dying (nothing trained is lost),
        unless the step was the first after a console's change, which is rolled back instead (``change_rollback``)."""
        try:
            return fn()
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            detail = str(exc).strip().split("\n")[0][:300]
        # outside the except block: the traceback and the tensors its frames held are gone
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        free_memory(self.device)
        if what == "training step" and self.rolled_back(detail):  # the change before it did not fit: no pause
            return None
        message, suggested = oom_advice(what, self.step, detail, self.config, self.run_dir)
        self.emit("error", step=self.step, message=message, kind="oom", suggested=suggested)
        self.control.pause(message)
        return None


class EvaluationInterrupted(Exception):
    """A stop signal arrived during evaluation."""
