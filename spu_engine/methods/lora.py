"""LoRA (Hu et al. 2021) through peft: W x + (alpha / r) B A x on the target projections.

B starts at zero, so adding LoRA to a running model leaves its function unchanged.
The LoRA factors and the task head train.
"""

from __future__ import annotations

from peft import LoraConfig
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ..policy import Peft, PolicyError
from .base import Host
from .peft_base import AddedTensorsMethod
from .peft_inject import eject, has_conv1d, inject, model_type
from .targets import NameSets, task_head_names

DEFAULT_TARGETS = {**TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "distilbert": ["q_lin", "v_lin"]}


class LoRA(AddedTensorsMethod):
    name = "lora"
    fixed = ("r", "alpha", "dropout", "target_modules")

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.head = NameSets(host, task_head_names)

    def gate(self, name: str) -> bool:
        return ".lora_" in name or name in self.head

    def add_to(self, model: nn.Module, settings: Peft) -> list[nn.Parameter]:
        targets = settings.target_modules or DEFAULT_TARGETS.get(model_type(model))
        if not targets:
            raise PolicyError(f"peft.target_modules: no default LoRA targets for model type {model_type(model)!r}; name the projections to adapt, e.g. [q_proj, v_proj]")
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(targets),
            fan_in_fan_out=has_conv1d(model),
            bias="none",
        )
        return inject(model, config, "peft.target_modules")

    def uninstall(self) -> None:
        eject(self.host.model)
