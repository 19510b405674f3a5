"""Selective backprop's policy section (torch-free: the policy and the console read it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from spu_engine.core.validation import Section


class SelectiveBackprop(Section):
    """Backward only on high-loss samples (Jiang et al. 2019)."""

    mode: Literal["off", "threshold", "percentile"] = "off"
    threshold: float = Field(0.0, ge=0.0, description="threshold mode: backward only on samples with loss >= threshold")
    keep: float = Field(
        0.5, gt=0.0, le=1.0, description="percentile mode: expected kept fraction; P(keep)=CDF(loss)^(1/keep-1)"
    )
    floor: float = Field(0.05, ge=0.0, le=1.0, description="percentile mode: minimum keep probability of any sample")
    history: int = Field(1024, ge=16, description="percentile mode: number of recent losses the CDF is taken over")
