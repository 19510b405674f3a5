"""Automatic freezing's policy section (torch-free: the policy and the console read it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool

from spu_engine.core.validation import Section


class AutoFreeze(Section):
    """Freezing that decides by itself which blocks train: LISA (Pan et al. 2024) or AutoFreeze (Liu et al. 2021)."""

    method: Literal["none", "lisa", "autofreeze"] = Field(
        "none",
        description="lisa: every `interval` steps train n_layers blocks drawn at random, the others frozen; autofreeze: "
        "freeze the front blocks whose gradient norm has settled, checked every `interval` steps",
    )
    interval: int = Field(
        20, ge=1, description="steps between two decisions (lisa: resamples; autofreeze: gradient-norm intervals)"
    )
    n_layers: int = Field(2, ge=1, description="lisa: blocks that train between two resamples")
    embeddings: StrictBool = Field(True, description="lisa: the embeddings train (true) or stay frozen (false)")
    head: StrictBool = Field(True, description="lisa: the head trains (true) or stays frozen (false)")
    optimizer_state: Literal["keep", "drop"] = Field(
        "keep",
        description="the AdamW state of a block automatic freezing freezes: kept for when it trains again, or dropped (frees its memory)",
    )
    threshold: float | None = Field(
        None,
        gt=0.0,
        description="autofreeze: a block has settled when the relative change of its mean gradient norm between two "
        "intervals is below this; unset: below the `percentile` of the trainable blocks' changes",
    )
    percentile: float = Field(
        50.0,
        gt=0.0,
        le=100.0,
        description="autofreeze without threshold: the percentile of the changes a block must be below (the paper's median)",
    )
    allow_gaps: StrictBool = Field(
        False,
        description="autofreeze: also freeze a settled block behind one that still trains (no backward saved for it)",
    )
    decided_through: int | None = Field(
        None,
        ge=0,
        description="written by the engine in an export: the decisions up to this step are the timeline's freeze "
        "entries, so a replay does not decide them again",
    )
