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

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from spu_engine.core.policy import Policy, PolicyError
from spu_engine.methods.base import Host, Method
from spu_engine.methods.peft.lr_range import lr_note
from spu_engine.methods.peft.oversize import lora_note, refuse_beyond, refuse_unfit
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

    def preview_notes(self, before: Policy, after: Policy) -> list[str]:
        """A switch to this method, or a new ``peft.lr``, says the lr its tensors get and the method's usual range."""
        if after.peft.method != self.name or (before.peft.method, before.peft.lr) == (self.name, after.peft.lr):
            return []
        note = lr_note(self.name, after.peft.lr, self.host.config.lr)
        return [note] if note else []


class AddedTensorsMethod(PeftMethod):
    """A method that adds tensors to the model: adapters, LoRA, IA3."""

    fixed: ClassVar[tuple[str, ...]]  # peft settings that shape the added tensors
    size_setting: ClassVar[str | None] = None  # the peft setting their size grows with (LoRA's r), said when too large

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.installed: Peft | None = None  # the settings the current tensors were built with
        self.trained = False  # has an optimizer step run since they were added?
        self._planned: dict[str, dict[str, int]] = {}  # settings (JSON) -> what planned() found
        self.sharded = False  # the model is sharded: it takes no new tensors, only the ones planned before
        self.parked: Peft | None = None  # tensors built with these settings, in the model but switched off
        self.parked_names: set[str] = set()  # their stable names

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

    def gate_under(self, policy: Policy):
        if policy.peft.method == self.name:
            return self.gate
        if self.parked_names:  # planned tensors waiting for their step: they stay as built (B = 0: no effect)
            return lambda name: name not in self.parked_names
        return None

    def plan(self, policies: list[Policy]) -> None:
        """Build, switched off, the tensors any of ``policies`` (the one at step 0, then the ones a sharded run's
        timeline reaches) would add: once the model is sharded it takes no new tensor, so they must exist before."""
        self.sharded = True
        wanted = {
            p.peft.model_dump_json(include=set(self.fixed)): p.peft for p in policies if p.peft.method == self.name
        }
        if not wanted:
            return
        if len(wanted) > 1:
            first, second = [dict(json.loads(k)) for k in list(wanted)[:2]]
            key = next(k for k in self.fixed if first.get(k) != second.get(k))
            raise PolicyError(
                f"peft.{key}: this sharded run's timeline builds {self.name} with {key} {first.get(key)!r} and later "
                f"{second.get(key)!r}; a sharded model takes its added tensors once, before training: keep one {key}"
            )
        settings = next(iter(wanted.values()))
        self.refuse_planned(settings, later=policies[0].peft.method != self.name)
        self.check_size(settings)
        before = set(self.host.params)
        with seeded(self.host.config.seed):
            self.install(settings)
        self.switch(False)
        self.parked = settings
        self.parked_names = {n for n in stable_parameters(self.host.model) if n not in before}

    def parked_tensors(self) -> set[str]:
        return set(self.parked_names)

    def preview_notes(self, before: Policy, after: Policy) -> list[str]:
        """The lr note; in a sharded run, a switch to this method says before it is made whether its tensors were
        planned."""
        notes = super().preview_notes(before, after)
        builds = before.peft.method != self.name or any(
            getattr(before.peft, k) != getattr(after.peft, k) for k in self.fixed
        )
        if after.peft.method == self.name and builds:
            try:
                notes += [note] if (note := self.size_said(after.peft)) is not None else []
            except PolicyError as exc:
                notes.append(f"refused: {exc}")
        if not self.sharded or after.peft.method != self.name or self.installed is not None:
            return notes
        if self.parked is None:
            return [
                *notes,
                f"refused in this sharded run: {self.name} was not planned (start with --plan-peft {self.name})",
            ]
        key = next((k for k in self.fixed if getattr(after.peft, k) != getattr(self.parked, k)), None)
        if key is not None:
            return [
                *notes,
                f"refused in this sharded run: {self.name} was planned with {key} {getattr(self.parked, key)!r}",
            ]
        return [*notes, f"{self.name}'s tensors were planned before sharding: switching them on costs nothing"]

    def oversize(self, settings: Peft) -> str | None:
        """A warning when the tensors ``settings`` add are larger than the layers they adapt (``oversize``); None when
        they are not.  By default LoRA's factors, sized by ``size_setting``."""
        if self.size_setting is None:
            return None
        value = getattr(settings, self.size_setting)
        return lora_note(f"peft.{self.size_setting}", value, self.planned(settings), self.host.params)

    def size_said(self, settings: Peft) -> str | None:
        """Before the tensors are built: the warning when one is larger than its layer (``oversize``); PolicyError
        where its rank could never be used or they could not fit in the device's free memory."""
        note = self.oversize(settings)
        if note is not None and self.size_setting is not None:
            value = getattr(settings, self.size_setting)
            setting, added = f"peft.{self.size_setting}", self.planned(settings)
            refuse_beyond(setting, value, added, self.host.params)
            refuse_unfit(setting, value, added, self.host.model)
        return note

    def check_size(self, settings: Peft) -> None:
        """The warning in the run's log as the tensors are built (at start, or when a change adds them)."""
        if (note := self.size_said(settings)) is not None:
            self.host.log(note, "warning")

    def refuse_planned(self, settings: Peft, later: bool) -> None:
        """PolicyError when ``settings`` cannot be built before training for a switch ``later`` than step 0 (an init
        that reads the weights as they are at its step)."""

    def switch(self, on: bool) -> None:
        """Turn the added tensors' effect on or off (peft's tuner layers skip a disabled adapter)."""
        for module in self.host.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(on)

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
        if self.parked is not None:
            params = self._unpark(policy.peft)
        elif self.sharded:
            self.refuse_planned(policy.peft, later=True)
            raise PolicyError(
                f"peft.method: {self.name} was not planned for this sharded run: a model sharded over the ranks takes no "
                f"new tensors, so the ones a method adds are built before training from the policy and its timeline; "
                f"start the run with --plan-peft {self.name} (built with the policy's peft settings) or put the "
                f"switch in the timeline (- {{step: N, set: {{peft: {{method: {self.name}}}}}}})"
            )
        else:
            self.check_size(policy.peft)
            with seeded(self.host.config.seed):  # the same tensors whenever they are added: a replay plans them ahead
                params = self.install(policy.peft)
        self.host.add_parameters(params, lr=policy.peft.lr, weight_decay=0.0, name=self.group)
        self.installed, self.trained = policy.peft, False

    def _unpark(self, settings: Peft) -> list[torch.nn.Parameter]:
        """The planned tensors, switched on, when ``settings`` build the same ones."""
        key = next((k for k in self.fixed if getattr(settings, k) != getattr(self.parked, k)), None)
        if key is not None:
            raise PolicyError(
                f"peft.{key}: this sharded run planned {self.name} with {key} {getattr(self.parked, key)!r}, not "
                f"{getattr(settings, key)!r}: a sharded model takes its added tensors once, before training"
            )
        self.switch(True)
        self.parked = None
        params = stable_parameters(self.host.model)
        names, self.parked_names = self.parked_names, set()
        return [params[n] for n in params if n in names]

    def _remove(self) -> None:
        if self.sharded:  # a sharded model keeps its tensors: switched off, as planned (nothing trained in them)
            self.switch(False)
            self.host.remove_parameters(self.group)
            self.parked, self.installed = self.installed, None
            self.parked_names = {n for n in self.host.param_names if n not in self.host.loaded_names}
            return
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


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The random stream a method's new tensors are drawn from: the run's seed alone, so they are the same at
    whichever step they are built (live, or planned ahead in a sharded run), and the run's own stream is untouched."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


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
