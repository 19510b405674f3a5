"""What the registry knows of a method without importing it: its policy section, settings and where its code is.

Torch-free, so the policy and the console (which never import torch) can read every method's section, and the
engine imports a method's implementation only when it builds its methods.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
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
    _cls: list[type] = field(default_factory=list, repr=False, compare=False)

    @property
    def section(self) -> str:
        return self.section_spec.name

    @property
    def settings(self) -> type[Section]:
        return self.section_spec.settings

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
