"""Applying a policy to a live model: shared by the engine and the in-your-own-loop controller.

A host has ``model``, ``methods`` (one instance per registered method), the
policy sections in force (``current``) and a ``_configure_methods(policy)``.
What trains is the freeze rules ANDed with every active method's gate.
"""

from __future__ import annotations

import torch

from .model import Units, check_policy_against_model, find_units, freeze_mask, stable_parameters
from .methods.peft_base import AddedTensorsMethod
from .policy import Change, Policy


class PolicyHost:
    model: torch.nn.Module
    methods: list
    current: Policy
    units: Units
    param_names: list[str]  # stable names (model.stable_name): as loaded, whatever PEFT wrapped since
    params: dict[str, torch.nn.Parameter]
    loaded_names: list[str]  # the names before any method added tensors

    def _configure_methods(self, policy: Policy) -> None:
        raise NotImplementedError

    def names_under(self, policy: Policy) -> list[str]:
        """Parameter names (stable) the model has under ``policy``: as loaded, plus what its PEFT method adds."""
        added: dict[str, int] = {}
        for m in self.methods:
            if isinstance(m, AddedTensorsMethod) and m.name == policy.peft.method:
                added = m.planned(policy.peft)
        return [*self.loaded_names, *added]

    def refresh_parameters(self) -> None:
        """Re-read the model's parameters and units after a method changed the module tree."""
        self.units = find_units(self.model)
        self.params = stable_parameters(self.model)
        self.param_names = list(self.params)

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def trainable_mask(self, policy: Policy | None = None) -> dict[str, bool]:
        policy = policy or self.current
        mask = freeze_mask(policy.freeze, self.param_names, self.units)
        for m in self.methods:
            if m.active:
                for n in self.param_names:
                    if mask[n] and not m.gate(n):
                        mask[n] = False
        return mask

    def _apply_trainable(self) -> None:
        """Frozen tensors get requires_grad False and lose their gradient (so no optimizer update)."""
        for n, trainable in self.trainable_mask().items():
            p = self.params[n]
            p.requires_grad_(trainable)
            if not trainable:
                p.grad = None

    def _take_change(self, change: Change) -> None:
        """Put ``change`` in force; on PolicyError (or any refusal) everything stays as it was."""
        new = self.current.apply(change)
        old = self.current
        try:
            self._configure_methods(new)
            check_policy_against_model(new, self.model, self.units)  # against the names the methods left (PEFT adds some)
        except Exception:
            self._configure_methods(old)
            raise
        self.current = new
        self._apply_trainable()
