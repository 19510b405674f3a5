"""The interface every selective-update method implements.

The engine owns one instance of each registered method for the whole run and
calls the hooks below at fixed points.  ``configure`` is called at a step
boundary whenever the policy changes (and once at start); it may raise
``PolicyError`` to refuse a change, which then leaves the engine untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

if TYPE_CHECKING:
    from ..engine import Engine
    from ..policy import Policy


class Method:
    section: ClassVar[str]  # the policy section this method reads

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine

    @property
    def active(self) -> bool:
        return False

    def configure(self, policy: "Policy", step: int) -> None:
        """Take the (new) policy into use at a step boundary."""

    def gate_under(self, policy: "Policy") -> Callable[[str], bool] | None:
        """Which parameters (stable names) may train under ``policy``, ANDed with the freeze rules; None: no limit.

        A function of the policy alone, so the host can also say what a change *would* train before making it.
        """
        return None

    def before_step(self, step: int) -> None:
        """Called before the batch of ``step`` is drawn."""

    def after_backward(self, step: int) -> None:
        """Gradients exist; the optimizer has not stepped yet."""

    def after_optimizer_step(self, step: int) -> None:
        """The optimizer has stepped (``step`` is the step just taken)."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """An evaluation finished."""

    def stats(self) -> dict[str, Any]:
        """Extra fields for the per-step event."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint with the model (masks, scores)."""
        return {}

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors from ``tensor_state`` back from a checkpoint (after the model's weights are loaded)."""
