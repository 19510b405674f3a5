"""Put peft tuner layers into a model in place, and take them out again.

``peft.inject_adapter_in_model`` keeps the model object (the engine, its units
and its optimizer keep working) but wraps each target module, so its tensors
are renamed ``<module>.base_layer.weight`` and the new ones are
``<module>.lora_A.default.weight`` / ``<module>.ia3_l.default``: still inside
the same block prefix, so they land in the same unit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from peft import PeftConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from spu_engine.core.policy import PolicyError


def inject(model: nn.Module, config: PeftConfig, key: str) -> list[nn.Parameter]:
    """Wrap the target modules; return the new parameters.  ``key`` names the policy key blamed on failure."""
    return inject_tuner(model, config, key, lambda: inject_adapter_in_model(config, model))[0]


def inject_tuner(
    model: nn.Module, config: PeftConfig, key: str, build: Callable[[], Any]
) -> tuple[list[nn.Parameter], Any]:
    """``build()`` wraps the target modules in place (peft's ``inject_adapter_in_model``, or a tuner such as
    ``AdaLoraModel`` whose state the caller keeps); its result and the new parameters."""
    before = {id(p): p.requires_grad for p in model.parameters()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # peft warns about fan_in_fan_out and unused configs; nothing the user can act on
            built = build()
    except ValueError as exc:
        eject(model)
        message = str(exc).strip().splitlines()[0]
        raise PolicyError(f"{key}: {message}") from None
    except Exception:  # out of memory half-way: no half-wrapped model is left behind
        eject(model)
        raise
    finally:  # peft freezes every tensor it did not add; trainability is the engine's business
        for p in model.parameters():
            if id(p) in before:
                p.requires_grad_(before[id(p)])
    return [p for p in model.parameters() if id(p) not in before], built


def eject(model: nn.Module) -> None:
    """Replace every tuner layer by the module it wraps (no merge: the added tensors are dropped)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    model.__dict__.pop("peft_config", None)


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or ""


def has_conv1d(model: nn.Module) -> bool:
    """GPT-2 style Conv1D stores weights [in, out]; LoRA must know (peft's fan_in_fan_out)."""
    return any(type(m).__name__ == "Conv1D" for m in model.modules())
