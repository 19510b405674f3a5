"""Weight-update skipping's policy section (torch-free: the policy and the console read it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool

from spu_engine.core.validation import Section


class WeightUpdateSkipping(Section):
    """Bias-only phases that end when eval loss stops improving (Safayanikoo & Akturk 2020)."""

    enabled: StrictBool = False
    patience: int = Field(2, ge=1, description="evals without improvement before switching phase")
    last_k_blocks: int | None = Field(None, ge=1, description="bias-only phase trains biases of the last k blocks only")
    start_phase: Literal["full", "bias_only"] = Field(
        "full", description="the first phase: full (every trainable tensor updates, as in the paper) or bias_only"
    )
    phase: Literal["full", "bias_only"] | None = Field(
        None,
        description="the phase in force; every switch sets it and is recorded in the timeline (unset: start_phase)",
    )

    def trains(self) -> str:
        """What the phase in force trains, in words (the what-if note and the console say it alike)."""
        phase = self.phase or self.start_phase
        if phase == "full":
            return "every trainable tensor"
        return "biases only" + (f" of the last {self.last_k_blocks} blocks" if self.last_k_blocks else "")


def phase_line(settings: WeightUpdateSkipping) -> str:
    """The console's line under the section: the phase in force and what it trains, or the first phase when off."""
    if settings.enabled:
        return f"phase now: {settings.phase or settings.start_phase}, trains {settings.trains()}"
    return f"off; first phase when on: {settings.start_phase}"
