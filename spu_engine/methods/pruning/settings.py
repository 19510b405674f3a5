"""Pruning's policy section and its nested settings (torch-free: the policy and the console read them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from spu_engine.core.validation import Section


class PruningSchedule(Section):
    kind: Literal["cubic", "constant"] = "cubic"
    start_step: int = Field(0, ge=0)
    end_step: int | None = Field(
        None,
        ge=0,
        description="the step the ramp reaches final_sparsity at; unset: the run's last step (steps - 1), so the run "
        "ends at final_sparsity whatever its length (a change applied mid-run too)",
    )
    every: int = Field(10, ge=1)
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    final_sparsity: float = Field(
        0.5, ge=0.0, lt=1.0, description="fraction of target weights removed at end_step; must be < 1"
    )

    @model_validator(mode="after")
    def _ordered(self) -> PruningSchedule:
        if self.end_step is not None and self.end_step < self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be >= start_step ({self.start_step})")
        return self


class IMPSettings(Section):
    rounds: int = Field(3, ge=1)
    fraction: float = Field(0.2, gt=0.0, lt=1.0, description="fraction of remaining weights removed per round")
    round_steps: int | None = Field(
        None,
        ge=1,
        description="training steps per round; unset: the steps from IMP's start to the run's end, shared by the "
        "rounds + 1 masks it trains",
    )
    reset: Literal["pretrained", "rewind"] = "rewind"
    rewind_step: int | None = Field(
        None,
        ge=0,
        description="rewind: the early step whose weights survivors return to; unset: the step IMP is switched on",
    )


class MovementSettings(Section):
    score_lr: float = Field(
        1e-2,
        gt=0.0,
        description="learning rate of the scores (their own AdamW group, no weight decay); the model's is the run's lr",
    )
    warmup: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="with schedule.start_step 0: the ramp starts after this fraction of the run's steps, the scores learning from the first "
        "step while the sparsity holds at initial_sparsity (the reference's initial_warmup); 0: the ramp starts at step 0",
    )
    final_hold: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="the ramp ends no later than this fraction of the run before its last step, so the run recovers at the final "
        "sparsity (the reference's final_warmup); 0: end_step alone",
    )
    l1: float = Field(
        0.0,
        ge=0.0,
        description="soft movement: weight of the penalty l1 * mean over target matrices of mean(sigmoid(score)) (the "
        "reference's final_lambda), scaled along the ramp (0 before it, l1 from its end)",
    )
    threshold: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="soft movement: starting threshold on sigmoid(score), in [0, 1); the schedule moves it to the target's",
    )
    final_threshold: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="soft movement as the reference does it: the threshold on sigmoid(score) follows the cubic from "
        "threshold to this value and the sparsity is whatever the scores give (final_sparsity unused), the L1 scaled "
        "by threshold / final_threshold; unset: the threshold lands the run on final_sparsity",
    )


class Pruning(Section):
    method: Literal["none", "magnitude", "imp", "movement", "soft_movement"] = Field(
        "none",
        description="none removes all masks; a change mid-run keeps the masks and continues from the current sparsity",
    )
    scope: Literal["global", "per_unit", "per_layer"] = Field(
        "global",
        description="global: one ranking over all targets; per_unit: every unit (block) loses the same fraction; per_layer: every target tensor does",
    )
    targets: list[str] | None = Field(
        None,
        description="globs over parameter names (only weight matrices are pruned); unset: every weight matrix inside the blocks "
        "(attention and FFN), so the head, pooler, classifier and embeddings are pruned only when a pattern names them",
    )
    exclude: list[str] = Field(
        default_factory=lambda: [
            "*embeddings*",
            "*LayerNorm*",
            "*layer_norm*",
            "*ln_*",
            "*norm*",
            "*.wte.*",
            "*.wpe.*",
            "*embed_tokens*",
        ],
        description="globs removed from targets (embeddings and norms by default)",
    )
    structure: Literal["weights", "heads_neurons"] = Field(
        "weights",
        description="weights: single entries; heads_neurons: whole attention heads and FFN neurons (what `spu export --compact` removes)",
    )
    schedule: PruningSchedule = Field(default_factory=PruningSchedule)
    imp: IMPSettings = Field(default_factory=IMPSettings)
    movement: MovementSettings = Field(default_factory=MovementSettings)

    def name_globs(self) -> dict[str, list[str]]:
        return {"targets": self.targets} if self.method != "none" and self.targets is not None else {}

    @model_validator(mode="after")
    def _structure_fits_method(self) -> Pruning:
        if self.structure == "heads_neurons" and self.method == "soft_movement":
            raise ValueError(
                "structure: heads_neurons works with magnitude, imp and movement; soft_movement thresholds single weights"
            )
        return self
