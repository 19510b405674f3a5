"""Gradient checkpointing as the policy's ``memory.gradient_checkpointing`` says: the model's own (transformers'
``gradient_checkpointing_enable``, non-reentrant), switched at a step boundary, refused for a model without it."""

from __future__ import annotations

from torch import nn

from spu_engine.core.policy import Policy, PolicyError


def check_memory_settings(policy: Policy, model: nn.Module) -> None:
    """A policy may ask for checkpointing only of a model that has it (transformers' models mostly do)."""
    wants = policy.memory.gradient_checkpointing or any(
        isinstance(e.set.get("memory"), dict) and e.set["memory"].get("gradient_checkpointing") for e in policy.timeline
    )
    if wants and not getattr(model, "supports_gradient_checkpointing", False):
        raise PolicyError(
            f"memory.gradient_checkpointing: {type(model).__name__} has no gradient checkpointing "
            "(transformers' supports_gradient_checkpointing is False); set it to false"
        )


class Checkpointing:
    """The model's gradient checkpointing, kept as the policy in force says (transformers 5 calls it activation
    checkpointing; older versions' names where the new ones are missing)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.on = False

    def follow(self, wanted: bool) -> bool:
        """Switch to ``wanted``; True when it changed (said by the caller)."""
        if wanted == self.on:
            return False
        model = self.model
        if wanted and hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif wanted:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        self.on = wanted
        return True
