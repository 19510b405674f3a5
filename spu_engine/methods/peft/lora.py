"""LoRA (Hu et al. 2021) through peft: W x + (alpha / r) B A x on the target projections.

B starts at zero, so adding LoRA to a running model leaves its function unchanged.
The LoRA factors and the task head train.  peft's variants are settings of the
same method: DoRA (``use_dora``), rsLoRA (``use_rslora``: alpha / sqrt(r)),
PiSSA (``init: pissa``: A and B take W's top singular part and W keeps the
residual, so the function is unchanged too), per-module ranks and alphas
(``rank_pattern``, ``alpha_pattern``); LoRA+ (``lr_ratio``) is B's learning
rate, which the host's optimizer groups carry (``runtime.lr_multipliers``).
"""

from __future__ import annotations

from peft import LoraConfig
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from spu_engine.core.policy import PolicyError
from spu_engine.methods.base import Host
from spu_engine.methods.peft.base import AddedTensorsMethod, LoRAPlus
from spu_engine.methods.peft.inject import eject, has_conv1d, inject, model_type
from spu_engine.methods.peft.settings import Peft
from spu_engine.methods.targets import NameSets, task_head_names

DEFAULT_TARGETS = {**TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "distilbert": ["q_lin", "v_lin"]}
INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "pissa_niter_4": "pissa_niter_4"}


def lora_targets(model: nn.Module, settings: Peft) -> list[str]:
    targets = settings.target_modules or DEFAULT_TARGETS.get(model_type(model))
    if not targets:
        raise PolicyError(
            f"peft.target_modules: no default LoRA targets for model type {model_type(model)!r}; name the projections to adapt, e.g. [q_proj, v_proj]"
        )
    return list(targets)


def lora_config(model: nn.Module, settings: Peft, init: bool | str | None = None) -> LoraConfig:
    """peft's config for ``settings``; ``init`` overrides the initialisation (a copy whose tensors are overwritten
    or have no values needs no SVD)."""
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_targets(model, settings),
        fan_in_fan_out=has_conv1d(model),
        bias="none",
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        init_lora_weights=INITS[settings.init] if init is None else init,
        rank_pattern=dict(settings.rank_pattern),
        alpha_pattern=dict(settings.alpha_pattern),
    )


class LoRA(LoRAPlus, AddedTensorsMethod):
    name = "lora"
    size_setting = "r"
    fixed = (
        "r",
        "alpha",
        "dropout",
        "target_modules",
        "use_dora",
        "use_rslora",
        "init",
        "rank_pattern",
        "alpha_pattern",
    )

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.head = NameSets(host, task_head_names)

    def gate(self, name: str) -> bool:
        return ".lora_" in name or name in self.head

    def add_to(self, model: nn.Module, settings: Peft) -> list[nn.Parameter]:
        on_meta = any(p.is_meta for p in model.parameters())
        return inject(model, lora_config(model, settings, init=True if on_meta else None), "peft.target_modules")

    def uninstall(self) -> None:
        eject(self.host.model)

    def refuse_planned(self, settings: Peft, later: bool) -> None:
        reads = "use_dora" if settings.use_dora else "init" if settings.init.startswith("pissa") else None
        if later and reads:
            raise PolicyError(
                f"peft.{reads}: {'DoRA takes its magnitudes' if reads == 'use_dora' else 'PiSSA takes its factors'} from "
                "the weights as they are at its step, and a sharded run builds its added tensors before training: "
                "switch to it at step 0, or run on one process"
            )
