"""The ``peft`` policy section every PEFT method reads (torch-free: the policy and the console read it)."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, StrictBool, field_validator, model_validator

from spu_engine.core.validation import Section

_MODULE_PATTERN = re.compile(r"^[A-Za-z0-9_.*^$|()\\\[\]+?-]{1,200}$")


class Peft(Section):
    # the methods each field applies to (a field not named applies to all)
    ONLY_FOR: ClassVar[dict[str, tuple[str, ...]]] = {
        "size": ("adapter",),
        "r": ("lora",),
        "alpha": ("lora", "adalora"),
        "dropout": ("lora", "adalora"),
        "target_modules": ("ia3", "lora", "adalora"),
        "lr": (
            "adapter",
            "ia3",
            "lora",
            "adalora",
            "bitfit",
        ),  # the tensors a method adds (bitfit: its biases and head)
        "use_dora": ("lora",),
        "use_rslora": ("lora",),
        "init": ("lora",),
        "lr_ratio": ("lora", "adalora"),
        "rank_pattern": ("lora",),
        "alpha_pattern": ("lora",),
        "init_r": ("adalora",),
        "target_r": ("adalora",),
        "tinit": ("adalora",),
        "tfinal": ("adalora",),
        "delta_t": ("adalora",),
        "total_step": ("adalora",),
    }

    method: Literal["none", "bitfit", "adapter", "ia3", "lora", "adalora"] = "none"
    size: int = Field(64, ge=1, description="adapter bottleneck size")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0.0, description="LoRA alpha")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None, description="LoRA / IA3 target module names (default: attention projections)"
    )
    lr: float | None = Field(
        None,
        gt=0.0,
        description="learning rate of the tensors the method trains (adapters, LoRA, AdaLoRA, IA3: the ones it adds; "
        "BitFit: the biases and the head, as an lr multiplier); default: the run's lr, a full fine-tuning rate at which "
        "they barely learn: the what-if names each method's usual range (lora 1e-4 to 1e-3, ia3 1e-3 to 1e-2, ...)",
    )
    use_dora: StrictBool = Field(
        False, description="lora: DoRA, the weight split into magnitude and direction (peft's use_dora)"
    )
    use_rslora: StrictBool = Field(
        False, description="lora: rank-stabilised scaling alpha / sqrt(r) instead of alpha / r"
    )
    init: Literal["default", "gaussian", "pissa", "pissa_niter_4", "olora"] = Field(
        "default",
        description="lora: how the factors start (peft's init_lora_weights); pissa moves the top singular part of W into A and B",
    )
    lr_ratio: float = Field(
        1.0,
        gt=0.0,
        le=1000.0,
        description="lora, adalora: LoRA+ (Hayou et al. 2024): B's learning rate = lr_ratio x A's (1: the same)",
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description="lora: rank by module name or regex, e.g. {'layer.0.attention.self.query': 4}; the rest r",
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="lora: alpha by module name or regex; the rest alpha"
    )
    init_r: int = Field(12, ge=1, description="adalora: the rank every adapted matrix starts with")
    target_r: int = Field(8, ge=1, description="adalora: the mean rank the budget ends at")
    tinit: int = Field(0, ge=0, description="adalora: steps before ranks are cut")
    tfinal: int = Field(0, ge=0, description="adalora: steps at the end with the final ranks fixed")
    delta_t: int = Field(1, ge=1, description="adalora: steps between two budget allocations (peft's deltaT)")
    total_step: int | None = Field(
        None, ge=1, description="adalora: the step count the budget schedule spans; default: the run's steps"
    )

    @classmethod
    def applicable(cls, values: dict[str, Any]) -> dict[str, Any]:
        """With a ``method``, only the fields that method reads (a LoRA change does not list AdaLoRA's ranks)."""
        method = values.get("method")
        if not isinstance(method, str):
            return values
        return {k: v for k, v in values.items() if method in cls.ONLY_FOR.get(k, (method,))}

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in v.items():
            if not _MODULE_PATTERN.match(key):
                raise ValueError(f"{key!r} is no module name or regex (letters, digits, '_', '.', and regex signs)")
            if value <= 0:
                raise ValueError(f"{key!r}: {value} must be > 0")
        return v

    @model_validator(mode="after")
    def _variants_fit_method(self) -> Peft:
        if self.method == "adalora":
            lora_only = [
                k
                for k in ("use_dora", "use_rslora", "init", "rank_pattern", "alpha_pattern")
                if k in self.model_fields_set
                and getattr(self, k) != type(self).model_fields[k].get_default(call_default_factory=True)
            ]
            if lora_only:
                raise ValueError(f"{lora_only[0]}: only with method lora (adalora sets each layer's rank itself)")
            if self.target_r > self.init_r:
                raise ValueError(
                    f"target_r ({self.target_r}) must be <= init_r ({self.init_r}): AdaLoRA only cuts ranks"
                )
            if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
                raise ValueError(
                    f"tinit ({self.tinit}) must be < total_step - tfinal ({self.total_step} - {self.tfinal}): no step would cut ranks"
                )
        return self
