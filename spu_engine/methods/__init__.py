"""Selective-update methods, registered in one place.

Each method reads one policy section.  A section whose settings are not the
defaults but that no registered method implements is refused by the engine
with a clear message rather than silently ignored.
"""

from __future__ import annotations

from .adalora import AdaLoRA
from .adapter import Adapter
from .auto_freeze import AutoFreeze
from .base import Method
from .bitfit import BitFit
from .distillation import Distillation
from .ia3 import IA3
from .lora import LoRA
from .pruning import PruningMethod
from .selective_backprop import SelectiveBackprop
from .weight_update_skipping import WeightUpdateSkipping

METHODS: list[type[Method]] = [
    AutoFreeze,  # first: its decisions change what trains, which the others read in their own before_step (movement's hooks)
    BitFit,
    Adapter,
    IA3,
    LoRA,
    AdaLoRA,
    SelectiveBackprop,
    WeightUpdateSkipping,
    PruningMethod,
    Distillation,
]

__all__ = ["METHODS", "Method"]
