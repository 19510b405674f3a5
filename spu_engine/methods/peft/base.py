"""What the ``peft`` methods share.

One ``peft.method`` is in force at a time.  BitFit only gates existing tensors,
so it can be switched on and off at any boundary.  Adapters, LoRA and IA3 add
tensors: adding them to a running model is well defined (each starts as the
identity, so the model computes what it did), and the new tensors join the
optimizer in a group of their own.  Removing them, or changing their shape,
once they have trained would silently change what the model computes, so that
is refused; at the boundary where they were added (nothing trained yet) it is
an undo.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from spu_engine.core.policy import Policy, PolicyError
from spu_engine.methods.base import Host, Method
from spu_engine.methods.peft.settings import Peft
from spu_engine.model.loading import stable_parameters


class PeftMethod(Method):
    section = "peft"
    name: ClassVar[str]  # the value of peft.method that selects this method

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.selected = False

    @property
    def active(self) -> bool:
        return self.selected

    def configure(self, policy: Policy, step: int) -> None:
        self.selected = policy.peft.method == self.name

    def gate_under(self, policy: Policy):
        return self.gate if policy.peft.method == self.name else None

    def gate(self, name: str) -> bool:
        """May parameter ``name`` train while this method is selected?"""
        raise NotImplementedError

    def leaves_under(self, policy: Policy) -> bool:
        return self.active and policy.peft.method != self.name


class AddedTensorsMethod(PeftMethod):
    """A method that adds tensors to the model: adapters, LoRA, IA3."""

    fixed: ClassVar[tuple[str, ...]]  # peft settings that shape the added tensors

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.installed: Peft | None = None  # the settings the current tensors were built with
        self.trained = False  # has an optimizer step run since they were added?
        self._planned: dict[str, dict[str, int]] = {}  # settings (JSON) -> what planned() found

    @property
    def group(self) -> str:
        return f"peft:{self.name}"

    def install(self, settings: Peft) -> list[torch.nn.Parameter]:
        """Add the tensors to the host's model and return them."""
        return self.add_to(self.host.model, settings)

    def add_to(self, model: nn.Module, settings: Peft) -> list[torch.nn.Parameter]:
        """Add the tensors to ``model`` (the host's, or a shape-only copy for planning) and return them."""
        raise NotImplementedError

    def uninstall(self) -> None:
        """Take the tensors out of the host's model again."""
        raise NotImplementedError

    def planned(self, settings: Peft) -> dict[str, int]:
        """Stable name -> size of every tensor this method would add, found by adding them to a shape-only copy."""
        key = settings.model_dump_json()
        if key not in self._planned:
            with torch.random.fork_rng(
                devices=[]
            ):  # initialising the copy's tensors must not move the run's RNG (replays stay exact)
                copy = shape_only_copy(self.host.model)
                if copy is None:
                    return {}
                before = set(stable_parameters(copy))
                self.add_to(copy, settings)
            self._planned[key] = {n: p.numel() for n, p in stable_parameters(copy).items() if n not in before}
        return self._planned[key]

    def added_under(self, policy: Policy) -> dict[str, int]:
        return self.planned(policy.peft) if policy.peft.method == self.name else {}

    def configure(self, policy: Policy, step: int) -> None:
        settings = policy.peft
        wanted = settings.method == self.name
        if self.installed is not None:
            changed = [k for k in self.fixed if getattr(settings, k) != getattr(self.installed, k)]
            if wanted and not changed:
                self._set_lr(settings)
                self.selected = True
                return
            if self.trained:
                if not wanted:
                    raise PolicyError(
                        f"peft.method: cannot change {self.name!r} to {settings.method!r} in a running model: the {self.name} "
                        "tensors have trained, and removing them would change what the model computes; start a new run for that"
                    )
                key = changed[0]
                raise PolicyError(
                    f"peft.{key}: cannot change {getattr(self.installed, key)!r} to {getattr(settings, key)!r} in a running model: "
                    f"the {self.name} tensors have trained with it; start a new run for that"
                )
            self._remove()
        if wanted:
            self._add(policy)
        self.selected = wanted

    def _add(self, policy: Policy) -> None:
        params = self.install(policy.peft)
        self.host.add_parameters(params, lr=policy.peft.lr, weight_decay=0.0, name=self.group)
        self.installed, self.trained = policy.peft, False

    def _remove(self) -> None:
        self.uninstall()
        self.host.remove_parameters(self.group)
        self.installed = None

    def _set_lr(self, settings: Peft) -> None:
        self.host.set_group_lr(self.group, settings.lr)

    def after_optimizer_step(self, step: int) -> None:
        if self.installed is not None:
            self.trained = True

    def state_dict(self) -> dict[str, Any]:
        return {"trained": self.trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trained = bool(state.get("trained", self.trained))


class LoRAPlus:
    """LoRA+ (Hayou et al. 2024) for the methods with LoRA's factors: B learns ``lr_ratio`` times as fast as A."""

    name: ClassVar[str]

    def lr_multipliers(self, policy: Policy, names: list[str]) -> dict[str, float]:
        if policy.peft.method != self.name or policy.peft.lr_ratio == 1.0:
            return {}
        # LoRA's lora_B.weight, AdaLoRA's lora_B
        return {n: policy.peft.lr_ratio for n in names if ".lora_B." in n or n.endswith(".lora_B")}

    def lr_setting(self, policy: Policy) -> str | None:
        return "peft.lr_ratio" if policy.peft.lr_ratio != 1.0 else None


def shape_only_copy(model: nn.Module) -> nn.Module | None:
    """A fresh copy of ``model``'s architecture on the meta device (no memory, no weights); None if it cannot be built."""
    config = getattr(model, "config", None)
    from_config = getattr(type(model), "_from_config", None)
    if config is None or from_config is None:
        return None
    try:
        with torch.device("meta"):
            return from_config(config)
    except Exception:
        return None
