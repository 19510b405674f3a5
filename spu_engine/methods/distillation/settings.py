"""Distillation's policy section (torch-free: the policy and the console read it)."""

from __future__ import annotations

from pydantic import Field, StrictBool, field_validator

from spu_engine.core.validation import Section


class Distillation(Section):
    enabled: StrictBool = False
    teacher: str = Field(
        "initial",
        min_length=1,
        max_length=4096,
        description="'initial': the model as this run loaded it at step 0 (fine-tune dense first, then prune from it); "
        "or a model folder (or hub id) with the same task head",
    )
    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="loss = (1 - alpha) * task loss + alpha * temperature^2 * KL(teacher || student)",
    )
    temperature: float = Field(2.0, gt=0.0, le=100.0, description="softmax temperature of both sides of the KL")

    @field_validator("teacher")
    @classmethod
    def _printable(cls, v: str) -> str:
        if any(not ch.isprintable() for ch in v):
            raise ValueError("teacher: 'initial' or a model folder; control characters are not allowed")
        return v
