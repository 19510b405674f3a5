"""Knowledge distillation from a teacher's logits (Hinton et al. 2015; as movement pruning uses it, Sanh et al. 2020).

The loss of each sample becomes ``(1 - alpha) * task loss + alpha * T^2 *
KL(softmax(teacher / T) || softmax(student / T))`` over the task's logits:
classes for classification, start and end positions for QA (averaged), every
labelled token for LM.  ``T^2`` keeps the gradient's scale as ``T`` changes.

The teacher is ``initial`` (the model as this run loaded it at step 0: the
dense model a pruning run starts from) or a model folder with the same head.
It runs beside the student without gradient, in eval mode, on the same device
and under the same autocast, so it costs one more forward per step; nothing
of it is trained or checkpointed (a resumed run loads it again).  Switching
distillation off frees it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spu_engine.core.policy import Policy, PolicyError
from spu_engine.methods.base import Host, Method, TrainingLoop
from spu_engine.methods.distillation.settings import Distillation as Settings


class Distillation(Method):
    section = "distillation"

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.settings = Settings()
        self.teacher: nn.Module | None = None
        self._teacher_of: str | None = None  # the ``teacher`` setting the loaded teacher came from
        self._kl: list[torch.Tensor] = []  # this step's mean KL per forward, for the step event (read once, in stats)
        self._task_loss: list[torch.Tensor] = []

    @property
    def active(self) -> bool:
        return self.settings.enabled

    def configure(self, policy: Policy, step: int) -> None:
        new = policy.distillation
        if not new.enabled:
            self.teacher, self._teacher_of = None, None
        elif self.teacher is None or new.teacher != self._teacher_of:
            teacher = self._load(new.teacher)  # may refuse: nothing has changed yet
            self.teacher, self._teacher_of = teacher, new.teacher
            self.host.log(
                f"distillation: teacher {'the model as loaded at step 0' if new.teacher == 'initial' else new.teacher} "
                f"(alpha {new.alpha:g}, temperature {new.temperature:g})"
            )
        self.settings = new

    def preview_notes(self, before: Policy, after: Policy) -> list[str]:
        kd = after.distillation
        if not kd.enabled:
            return []
        teacher = "the model as loaded at step 0" if kd.teacher == "initial" else kd.teacher
        return [
            (
                f"distillation: one more forward per step through the teacher ({teacher}), and its weights in memory; "
                f"loss = {1 - kd.alpha:g} x task + {kd.alpha:g} x T^2 x KL at T = {kd.temperature:g}"
            )
        ]

    def _load(self, source: str) -> nn.Module:
        try:
            teacher = self.host.initial_model() if source == "initial" else self.host.load_teacher(source)
        except PolicyError as exc:
            raise PolicyError(f"distillation.teacher: {exc}") from None
        student = self.host.model.get_base_model() if hasattr(self.host.model, "get_base_model") else self.host.model
        # the same vocabulary (the student's token ids mean the same words) and, for classification, the same classes
        keys = (
            ("vocab_size", "num_labels")
            if type(student).__name__.endswith("ForSequenceClassification")
            else ("vocab_size",)
        )
        for key in keys:
            mine, theirs = getattr(student.config, key, None), getattr(getattr(teacher, "config", None), key, None)
            if mine is not None and theirs is not None and mine != theirs:
                raise PolicyError(
                    f"distillation.teacher: {source!r} has {key} {theirs}, the model being trained has {mine}; "
                    "the teacher needs the same vocabulary and head"
                )
        device = next(self.host.model.parameters()).device
        teacher.to(device).eval().requires_grad_(False)
        return teacher

    # ------------------------------------------------------------------ the loss

    def per_sample_loss(self, loop: TrainingLoop, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The engine's loss with the teacher's KL mixed in (selective backprop scores with it too)."""
        task, s = loop.task, self.settings
        student = task.outputs(loop.model, batch)
        loss = task.loss_from(student, batch)
        with torch.no_grad():
            teacher = task.outputs(self.teacher, batch)
        kl = task.per_sample_kl(student, teacher, batch, s.temperature)
        self._kl.append(kl.detach().mean())  # no device sync here: stats reads them once per step
        self._task_loss.append(loss.detach().mean())
        return (1.0 - s.alpha) * loss + (s.alpha * s.temperature**2) * kl

    def before_step(self, step: int) -> None:
        self._kl, self._task_loss = [], []

    def stats(self, step: int) -> dict[str, Any]:
        if not self.active or not self._kl:
            return {}
        kl, task = torch.stack(self._kl).mean(), torch.stack(self._task_loss).mean()
        return {"distill_kl": round(float(kl), 6), "task_loss": round(float(task), 6)}
