"""What the registry knows of a method without importing it: its policy section, settings and where its code is.

Torch-free, so the policy and the console (which never import torch) can read every method's section, and the
engine imports a method's implementation only when it builds its methods.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from spu_engine.core.validation import Section


class Stage(IntEnum):
    """When a method runs among the others (each hook, and ``configure``); the same stage keeps registry order."""

    DECIDES_TRAINING = 0  # its decisions change what trains, which the others read in their before_step (auto-freeze)
    CHANGES_MODULES = 1  # adds or wraps modules, so the methods after it see the model's final names (PEFT)
    TRAINS = 2  # everything else


@dataclass(frozen=True)
class ConsoleField:
    """One control the console shows for a section: where its value lives (dotted path), the widget id, the label."""

    path: str
    id: str
    label: str
    unset: str = ""  # an optional number's placeholder: what leaving it empty means ("run's end")


@dataclass(frozen=True)
class SectionSpec:
    """A policy section a method reads, and how the console shows it.

    ``status``, when given, says in one line what the section's settings do now (weight-update skipping's phase);
    the console shows it under the section's fields.
    """

    name: str  # the policy key: "pruning"
    settings: type[Section]  # its pydantic model, defaults and checks included
    title: str  # the console's heading
    fields: tuple[ConsoleField, ...] = ()
    status: Callable[[Any], str] | None = None  # settings -> a line for the console


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: the section it reads and its implementation, imported only when first built."""

    name: str  # "lora"; the section's name for a method that has a section of its own
    section_spec: SectionSpec
    implementation: str  # "spu_engine.methods.peft.lora:LoRA"
    stage: Stage = Stage.TRAINS
    switch: str | None = None  # the setting that turns it on: a bool, or where methods share a section, its name
    ablates: str | None = None  # what `spu ablate` removes of it block by block ("Houlsby adapters"); None: none
    _cls: list[type] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.ablates and self.switch is None:
            raise TypeError(f"{self.name}: an ablatable method says which setting turns it on (switch)")

    @property
    def section(self) -> str:
        return self.section_spec.name

    @property
    def settings(self) -> type[Section]:
        return self.section_spec.settings

    def switch_value(self, values: Mapping[str, Any]) -> Any:
        """The switch's value in ``values`` (the section as the policy carries it), its default if unset."""
        if self.switch is None:
            raise TypeError(f"{self.name} names no switch")
        return values.get(self.switch, self.settings.model_fields[self.switch].get_default())

    def in_use(self, values: Mapping[str, Any]) -> bool:
        """Whether the section's ``values`` turn this method on (its switch is on, or names it)."""
        value = self.switch_value(values)
        return value if isinstance(value, bool) else value == self.name

    def switch_text(self, values: Mapping[str, Any]) -> str:
        """The switch as the policy writes it: ``peft.method: none``."""
        return f"{self.section}.{self.switch}: {self.switch_value(values)}"

    def load(self) -> type:
        """The implementation's class, a ``methods.base.Method`` (imports it, and so torch, the first time; not named
        here, so the registry stays below the policy in the import graph)."""
        if not self._cls:
            module, _, name = self.implementation.partition(":")
            cls = getattr(importlib.import_module(module), name)
            if cls.section != self.section:
                raise TypeError(f"{self.implementation} reads section {cls.section!r}, registered for {self.section!r}")
            self._cls.append(cls)
        return self._cls[0]
