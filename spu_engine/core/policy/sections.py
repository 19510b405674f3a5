"""The policy's own sections (no method reads them alone) and the list of every section a change may set."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool

from spu_engine.core.policy.selectors import ScaleRule
from spu_engine.core.validation import Section
from spu_engine.methods.registry import section_specs


class LearningRates(Section):
    """Learning-rate multipliers per unit (on top of the run's schedule), and the ramp of what starts training live."""

    decay: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="layer-wise decay: the top block and the head get 1, each block below decay times the one above, embeddings the lowest (1: off)",
    )
    scale: list[ScaleRule] = Field(
        default_factory=list,
        description="multipliers by unit, block or name glob, as freeze rules select (last match wins); times the decay's factor",
    )
    warm_in: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="steps over which a tensor that starts training after step 0 (unfrozen or added live) ramps its lr in linearly (0: at once)",
    )


class Memory(Section):
    """How a step is computed to fit device memory; the arithmetic stays the same (switchable at any boundary)."""

    grad_accum: int = Field(
        1,
        ge=1,
        le=4096,
        description="micro-batches per optimizer step: the batch is cut into this many forward and backward passes "
        "whose gradients add up to the whole batch's (the same update; activations for one micro-batch at a time)",
    )
    gradient_checkpointing: StrictBool = Field(
        False,
        description="recompute each block's activations in backward instead of storing them (non-reentrant; about "
        "a third more compute); blocks below the first trainable tensor store none either way",
    )


class Faults(Section):
    on_nonfinite: Literal["pause", "skip", "stop"] = "skip"


SECTIONS = (
    "freeze",
    *section_specs(),
    "faults",
    "lr",
    "memory",
)  # the policy's order; a method's sections from the registry
