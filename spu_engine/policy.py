"""The policy: the one declarative object describing which parameters learn and how.

The console edits it, the engine applies it, YAML stores it.  A policy has a
current state (the sections below) and a ``timeline`` of changes keyed by step,
so an exported file replays a whole interactive run; its ``run:`` section holds
the run settings (model, data, steps, lr and schedule, seed, ...), so the file
replays it alone.

Timeline semantics (also used for live changes sent by the console):

* ``freeze``: rules *appended* to the freeze list (last match wins, so an
  appended rule overrides earlier ones for what it matches);
* ``set``: a partial policy merged section by section (nested mappings merge,
  lists such as ``freeze`` or ``pruning.targets`` are replaced whole).

An entry happens at a ``step``, or is a *trigger*: ``at: {epoch: N}`` (the
first step of epoch N, counted from 0) or ``when`` an evaluation metric meets
a condition.  A trigger that fires is recorded as a plain step entry, and the
trigger itself keeps the steps it fired at (``fired``), so an exported policy
replays those firings from its step entries without deciding them again.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import RunSettings
from .validation import error_text, key_path

POLICY_VERSION = 1


class PolicyError(ValueError):
    """A user error in a policy: the message names the key path and the offending value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- freeze

_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:-|\.\.)\s*(-?\d+)\s*$")


class Selector(_Section):
    """Select parameters by block index, unit name and/or name glob (all given selectors must match)."""

    kind: ClassVar[str] = "rule"

    match: str | None = Field(None, description="glob over parameter names, e.g. '*.bias' or '*attention*'")
    layers: list[int] | None = Field(None, description="block indices; YAML may also say '0-3'. Negative counts from the end.")
    units: list[str] | None = Field(None, description="unit names: 'embeddings', 'head', 'block3'")

    @field_validator("layers", mode="before")
    @classmethod
    def _expand_ranges(cls, v: Any) -> Any:
        if isinstance(v, (int, str)):
            v = [v]
        if isinstance(v, list):
            out: list[Any] = []
            for item in v:
                if isinstance(item, str):
                    m = _RANGE.match(item)
                    if m:
                        a, b = int(m.group(1)), int(m.group(2))
                        if b < a:
                            raise ValueError(f"range {item!r} is empty: write low-high")
                        out.extend(range(a, b + 1))
                        continue
                    if item.strip().lstrip("-").isdigit():
                        out.append(int(item))
                        continue
                    raise ValueError(f"{item!r} is not a block index or a range like '0-3'")
                out.append(item)
            return out
        return v

    @field_validator("units", mode="before")
    @classmethod
    def _one_unit(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _needs_selector(self) -> "Selector":
        if self.match is None and self.layers is None and self.units is None:
            raise ValueError(f"a {self.kind} needs at least one of 'match', 'layers', 'units'")
        return self


class FreezeRule(Selector):
    """Whether the selected parameters train."""

    kind: ClassVar[str] = "freeze rule"

    trainable: bool
    by: Literal["auto_freeze"] | None = Field(
        None, description="written by the engine on the rules automatic freezing decided; a rule without it that follows one "
        "takes the units it selects out of automatic freezing"
    )


class ScaleRule(Selector):
    """A learning-rate multiplier for the selected parameters."""

    kind: ClassVar[str] = "scale rule"

    scale: float = Field(gt=0.0, le=1000.0, description="multiplies the schedule's learning rate (freeze a tensor instead of 0)")


# --------------------------------------------------------------------------- methods


class SelectiveBackprop(_Section):
    """Backward only on high-loss samples (Jiang et al. 2019)."""

    mode: Literal["off", "threshold", "percentile"] = "off"
    threshold: float = Field(0.0, ge=0.0, description="threshold mode: backward only on samples with loss >= threshold")
    keep: float = Field(0.5, gt=0.0, le=1.0, description="percentile mode: expected kept fraction; P(keep)=CDF(loss)^(1/keep-1)")
    floor: float = Field(0.05, ge=0.0, le=1.0, description="percentile mode: minimum keep probability of any sample")
    history: int = Field(1024, ge=16, description="percentile mode: number of recent losses the CDF is taken over")


class WeightUpdateSkipping(_Section):
    """Bias-only phases that end when eval loss stops improving (Safayanikoo & Akturk 2020)."""

    enabled: bool = False
    patience: int = Field(2, ge=1, description="evals without improvement before switching phase")
    last_k_blocks: int | None = Field(None, ge=1, description="bias-only phase trains biases of the last k blocks only")
    start_phase: Literal["full", "bias_only"] = Field(
        "full", description="the first phase: full (every trainable tensor updates, as in the paper) or bias_only"
    )
    phase: Literal["full", "bias_only"] | None = Field(
        None, description="the phase in force; every switch sets it and is recorded in the timeline (unset: start_phase)"
    )


class PruningSchedule(_Section):
    kind: Literal["cubic", "constant"] = "cubic"
    start_step: int = Field(0, ge=0)
    end_step: int = Field(1000, ge=0)
    every: int = Field(10, ge=1)
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    final_sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of target weights removed at end_step; must be < 1")

    @model_validator(mode="after")
    def _ordered(self) -> "PruningSchedule":
        if self.end_step < self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be >= start_step ({self.start_step})")
        return self


class IMPSettings(_Section):
    rounds: int = Field(3, ge=1)
    fraction: float = Field(0.2, gt=0.0, lt=1.0, description="fraction of remaining weights removed per round")
    round_steps: int = Field(200, ge=1, description="training steps per round")
    reset: Literal["pretrained", "rewind"] = "rewind"
    rewind_step: int | None = Field(
        None, ge=0, description="rewind: the early step whose weights survivors return to; unset: the step IMP is switched on"
    )


class MovementSettings(_Section):
    score_lr: float = Field(1e-2, gt=0.0, description="learning rate of the scores (their own AdamW group, no weight decay); the model's is the run's lr")
    warmup: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="with schedule.start_step 0: the ramp starts after this fraction of the run's steps, the scores learning from the first "
        "step while the sparsity holds at initial_sparsity (the reference's initial_warmup); 0: the ramp starts at step 0",
    )
    final_hold: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="the ramp ends no later than this fraction of the run before its last step, so the run recovers at the final "
        "sparsity (the reference's final_warmup); 0: end_step alone",
    )
    l1: float = Field(
        0.0, ge=0.0, description="soft movement: weight of the penalty l1 * mean(sigmoid(score)), scaled along the ramp (0 before it, l1 from its end)"
    )
    threshold: float = Field(
        0.0, ge=0.0, lt=1.0, description="soft movement: starting threshold on sigmoid(score), in [0, 1); the schedule moves it to the target's"
    )


class Pruning(_Section):
    method: Literal["none", "magnitude", "imp", "movement", "soft_movement"] = Field(
        "none", description="none removes all masks; a change mid-run keeps the masks and continues from the current sparsity"
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
        default_factory=lambda: ["*embeddings*", "*LayerNorm*", "*layer_norm*", "*ln_*", "*norm*", "*.wte.*", "*.wpe.*", "*embed_tokens*"],
        description="globs removed from targets (embeddings and norms by default)",
    )
    structure: Literal["weights", "heads_neurons"] = Field(
        "weights",
        description="weights: single entries; heads_neurons: whole attention heads and FFN neurons (what `spu export --compact` removes)",
    )
    schedule: PruningSchedule = Field(default_factory=PruningSchedule)
    imp: IMPSettings = Field(default_factory=IMPSettings)
    movement: MovementSettings = Field(default_factory=MovementSettings)

    @model_validator(mode="after")
    def _structure_fits_method(self) -> "Pruning":
        if self.structure == "heads_neurons" and self.method == "soft_movement":
            raise ValueError("structure: heads_neurons works with magnitude, imp and movement; soft_movement thresholds single weights")
        return self


_MODULE_PATTERN = re.compile(r"^[A-Za-z0-9_.*^$|()\\\[\]+?-]{1,200}$")


class Peft(_Section):
    method: Literal["none", "bitfit", "adapter", "ia3", "lora", "adalora"] = "none"
    size: int = Field(64, ge=1, description="adapter bottleneck size")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0.0, description="LoRA alpha")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, description="LoRA / IA3 target module names (default: attention projections)")
    lr: float | None = Field(None, gt=0.0, description="learning rate of the tensors a method adds (adapters, LoRA, IA3); default: the run's lr")
    use_dora: bool = Field(False, description="lora: DoRA, the weight split into magnitude and direction (peft's use_dora)")
    use_rslora: bool = Field(False, description="lora: rank-stabilised scaling alpha / sqrt(r) instead of alpha / r")
    init: Literal["default", "gaussian", "pissa", "pissa_niter_4", "olora"] = Field(
        "default", description="lora: how the factors start (peft's init_lora_weights); pissa moves the top singular part of W into A and B"
    )
    lr_ratio: float = Field(
        1.0, gt=0.0, le=1000.0, description="lora, adalora: LoRA+ (Hayou et al. 2024): B's learning rate = lr_ratio x A's (1: the same)"
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="lora: rank by module name or regex, e.g. {'layer.0.attention.self.query': 4}; the rest r"
    )
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="lora: alpha by module name or regex; the rest alpha")
    init_r: int = Field(12, ge=1, description="adalora: the rank every adapted matrix starts with")
    target_r: int = Field(8, ge=1, description="adalora: the mean rank the budget ends at")
    tinit: int = Field(0, ge=0, description="adalora: steps before ranks are cut")
    tfinal: int = Field(0, ge=0, description="adalora: steps at the end with the final ranks fixed")
    delta_t: int = Field(1, ge=1, description="adalora: steps between two budget allocations (peft's deltaT)")
    total_step: int | None = Field(None, ge=1, description="adalora: the step count the budget schedule spans; default: the run's steps")

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
    def _variants_fit_method(self) -> "Peft":
        if self.method == "adalora":
            lora_only = [k for k in ("use_dora", "use_rslora", "init", "rank_pattern", "alpha_pattern") if k in self.model_fields_set and getattr(self, k)
                         != type(self).model_fields[k].get_default(call_default_factory=True)]
            if lora_only:
                raise ValueError(f"{lora_only[0]}: only with method lora (adalora sets each layer's rank itself)")
            if self.target_r > self.init_r:
                raise ValueError(f"target_r ({self.target_r}) must be <= init_r ({self.init_r}): AdaLoRA only cuts ranks")
            if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
                raise ValueError(
                    f"tinit ({self.tinit}) must be < total_step - tfinal ({self.total_step} - {self.tfinal}): no step would cut ranks"
                )
        return self


class LearningRates(_Section):
    """Learning-rate multipliers per unit (on top of the run's schedule), and the ramp of what starts training live."""

    decay: float = Field(
        1.0, gt=0.0, le=1.0,
        description="layer-wise decay: the top block and the head get 1, each block below decay times the one above, embeddings the lowest (1: off)",
    )
    scale: list["ScaleRule"] = Field(
        default_factory=list, description="multipliers by unit, block or name glob, as freeze rules select (last match wins); times the decay's factor"
    )
    warm_in: int = Field(
        0, ge=0, le=1_000_000,
        description="steps over which a tensor that starts training after step 0 (unfrozen or added live) ramps its lr in linearly (0: at once)",
    )


class Distillation(_Section):
    enabled: bool = False
    teacher: str = Field(
        "initial", min_length=1, max_length=4096,
        description="'initial': the model as this run loaded it at step 0 (fine-tune dense first, then prune from it); "
        "or a model folder (or hub id) with the same task head",
    )
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="loss = (1 - alpha) * task loss + alpha * temperature^2 * KL(teacher || student)")
    temperature: float = Field(2.0, gt=0.0, le=100.0, description="softmax temperature of both sides of the KL")

    @field_validator("teacher")
    @classmethod
    def _printable(cls, v: str) -> str:
        if any(not ch.isprintable() for ch in v):
            raise ValueError("teacher: 'initial' or a model folder; control characters are not allowed")
        return v


class AutoFreeze(_Section):
    """Freezing that decides by itself which blocks train: LISA (Pan et al. 2024) or AutoFreeze (Liu et al. 2021)."""

    method: Literal["none", "lisa", "autofreeze"] = Field(
        "none", description="lisa: every `interval` steps train n_layers blocks drawn at random, the others frozen; autofreeze: "
        "freeze the front blocks whose gradient norm has settled, checked every `interval` steps"
    )
    interval: int = Field(20, ge=1, description="steps between two decisions (lisa: resamples; autofreeze: gradient-norm intervals)")
    n_layers: int = Field(2, ge=1, description="lisa: blocks that train between two resamples")
    embeddings: bool = Field(True, description="lisa: the embeddings train (true) or stay frozen (false)")
    head: bool = Field(True, description="lisa: the head trains (true) or stays frozen (false)")
    optimizer_state: Literal["keep", "drop"] = Field(
        "keep", description="the AdamW state of a block automatic freezing freezes: kept for when it trains again, or dropped (frees its memory)"
    )
    threshold: float | None = Field(
        None, gt=0.0, description="autofreeze: a block has settled when the relative change of its mean gradient norm between two "
        "intervals is below this; unset: below the `percentile` of the trainable blocks' changes"
    )
    percentile: float = Field(50.0, gt=0.0, le=100.0, description="autofreeze without threshold: the percentile of the changes a block must be below (the paper's median)")
    allow_gaps: bool = Field(False, description="autofreeze: also freeze a settled block behind one that still trains (no backward saved for it)")
    decided_through: int | None = Field(
        None, ge=0, description="written by the engine in an export: the decisions up to this step are the timeline's freeze "
        "entries, so a replay does not decide them again"
    )


class Faults(_Section):
    on_nonfinite: Literal["pause", "skip", "stop"] = "skip"


SECTIONS = ("freeze", "selective_backprop", "weight_update_skipping", "pruning", "peft", "distillation", "auto_freeze", "faults", "lr")


class Change(_Section):
    """One change: freeze rules to append and/or sections to merge."""

    freeze: list[FreezeRule] = Field(default_factory=list)
    set: dict[str, Any] = Field(default_factory=dict)

    @field_validator("set")
    @classmethod
    def _known_sections(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key not in SECTIONS:
                raise ValueError(f"unknown section {key!r}; sections are {', '.join(SECTIONS)}")
        return v



class At(_Section):
    """A trigger on the clock: at a step (the same as a plain ``step:``) or at the first step of an epoch."""

    step: int | None = Field(None, ge=0, description="fires before optimizer step `step` (0-based), as a plain `step:` entry")
    epoch: int | None = Field(
        None, ge=0,
        description="fires at the first step of this epoch, counted from 0 as the HF Trainer's state.epoch: `epoch: 2` fires after "
        "two full epochs; an epoch is len(train) // (batch_size * world_size) steps",
    )

    @model_validator(mode="after")
    def _one(self) -> "At":
        if (self.step is None) == (self.epoch is None):
            raise ValueError("give exactly one of 'step' or 'epoch', e.g. {epoch: 2}")
        return self


COMPARISONS = {  # key -> how it reads; the value is a number, or a margin (>= 0) against the best value so far
    "below": "<", "at_most": "<=", "above": ">", "at_least": ">=", "below_best_by": "< best -", "above_best_by": "> best +",
}
_METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")


class MetricCondition(_Section):
    """An evaluation metric compared with a number, or with the best value of the earlier evaluations."""

    metric: str = Field(description="a numeric field of the eval events: eval_loss, accuracy (classification), f1 / exact_match (QA), perplexity (LM)")
    below: float | None = Field(None, description="holds when metric < below")
    at_most: float | None = Field(None, description="holds when metric <= at_most")
    above: float | None = Field(None, description="holds when metric > above")
    at_least: float | None = Field(None, description="holds when metric >= at_least")
    below_best_by: float | None = Field(
        None, ge=0.0, description="holds when metric < (lowest value of the earlier evaluations) - margin; never at the first evaluation"
    )
    above_best_by: float | None = Field(
        None, ge=0.0, description="holds when metric > (highest value of the earlier evaluations) + margin; never at the first evaluation"
    )

    @field_validator("metric")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _METRIC_NAME.match(v):
            raise ValueError("a metric name is letters, digits, '_' and '.' (at most 64), e.g. eval_loss, accuracy, f1")
        return v

    @model_validator(mode="after")
    def _one_comparison(self) -> "MetricCondition":
        given = [k for k in COMPARISONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one comparison of {self.metric!r}: one of {', '.join(COMPARISONS)}" + (f" (got {', '.join(given)})" if given else ""))
        return self

    @property
    def comparison(self) -> tuple[str, float]:
        key = next(k for k in COMPARISONS if getattr(self, k) is not None)
        return key, getattr(self, key)

    def holds(self, value: float, lowest: float | None, highest: float | None) -> bool:
        """Does ``value`` meet the condition, given the lowest and highest values of the earlier evaluations (None: none yet)?"""
        key, bound = self.comparison
        if key == "below_best_by":
            return lowest is not None and value < lowest - bound
        if key == "above_best_by":
            return highest is not None and value > highest + bound
        return {"below": value < bound, "at_most": value <= bound, "above": value > bound, "at_least": value >= bound}[key]

    def describe(self) -> str:
        key, bound = self.comparison
        return f"{self.metric} {COMPARISONS[key]} {bound:g}"


class TimelineEntry(Change):
    """A change at a step, or a trigger: at an epoch, or when an evaluation metric meets a condition."""

    step: int | None = Field(None, ge=0, description="apply before optimizer step `step` (0-based); the same as at: {step: N}")
    at: At | None = Field(None, description="{epoch: N}: at the first step of epoch N (from 0); {step: N} is read as step: N")
    when: MetricCondition | None = Field(None, description="checked at every evaluation the run schedules (every eval_every steps, and the last)")
    once: bool = Field(True, description="when-triggers: fire the first time the condition holds (true), or at every evaluation where it holds")
    after_step: int = Field(
        0, ge=0, description="when-triggers: checked only at evaluations after this step (a trigger added live starts where it was added)"
    )
    fired: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list,
        description="triggers: the steps it fired at in the run this policy was exported from, each recorded there as a step entry; "
        "evaluations up to the last of them are not checked again, and a once-trigger that fired never fires again",
    )

    @field_validator("at", "when", mode="before")
    @classmethod
    def _mapping(cls, v: Any, info: Any) -> Any:
        if v is not None and not isinstance(v, (dict, BaseModel)):
            example = "{epoch: 2} or {step: 300}" if info.field_name == "at" else "{metric: eval_loss, below_best_by: 0.01}"
            raise ValueError(f"a mapping such as {example}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _at_step_is_step(cls, data: Any) -> Any:
        """``at: {step: N}`` is the plain ``step: N`` entry (one form for it everywhere: sorting, export, replay)."""
        if not isinstance(data, dict) or "step" in data:
            return data
        at = data.get("at")
        n = at.get("step") if isinstance(at, dict) and set(at) == {"step"} else at.step if isinstance(at, At) and at.epoch is None else None
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            return {**{k: v for k, v in data.items() if k != "at"}, "step": n}
        return data

    @model_validator(mode="after")
    def _one_moment(self) -> "TimelineEntry":
        given = [k for k in ("step", "at", "when") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a timeline entry needs exactly one of 'step: N', 'at: {epoch: N}' or 'when: {metric: ..., below: ...}'"
                + (f" (got {' and '.join(given)})" if given else "")
            )
        if self.when is None:
            extra = [k for k in ("once", "after_step") if getattr(self, k) != type(self).model_fields[k].default]
            if extra:
                raise ValueError(f"{extra[0]}: only for 'when' triggers (a step or epoch entry fires once)")
        if self.step is not None and self.fired:
            raise ValueError("fired: only triggers (at: {epoch: N}, when) record the steps they fired at")
        if self.is_trigger and not self.freeze and not self.set:
            raise ValueError(f"the trigger {self.moment()} changes nothing: give 'freeze' rules and/or 'set' sections")
        return self

    @property
    def is_trigger(self) -> bool:
        return self.step is None

    def moment(self) -> str:
        """When it happens, in words: ``step 300``, ``epoch 2``, ``when eval_loss < best - 0.01 (every time)``."""
        if self.step is not None:
            return f"step {self.step}"
        if self.at is not None:
            return f"epoch {self.at.epoch}"
        assert self.when is not None
        return f"when {self.when.describe()}" + ("" if self.once else " (every time)") + (f" after step {self.after_step}" if self.after_step else "")

    def checked_at(self, step: int) -> bool:
        """Is this when-trigger decided live at the evaluation of ``step`` (not settled by its recorded firings)?"""
        if self.when is None or step <= self.after_step or (self.once and self.fired):
            return False
        return not self.fired or step > self.fired[-1]


class Policy(_Section):
    spu_policy: Literal[1] = POLICY_VERSION
    run: RunSettings | None = Field(
        None, description="the run settings this policy was trained with; `spu train --policy FILE` uses them, command-line flags override"
    )
    freeze: list[FreezeRule] = Field(default_factory=list, description="rules in order; last match wins; default trainable")
    selective_backprop: SelectiveBackprop = Field(default_factory=SelectiveBackprop)
    weight_update_skipping: WeightUpdateSkipping = Field(default_factory=WeightUpdateSkipping)
    pruning: Pruning = Field(default_factory=Pruning)
    peft: Peft = Field(default_factory=Peft)
    distillation: Distillation = Field(default_factory=Distillation)
    auto_freeze: AutoFreeze = Field(default_factory=AutoFreeze)
    faults: Faults = Field(default_factory=Faults)
    lr: LearningRates = Field(default_factory=LearningRates)
    timeline: list[TimelineEntry] = Field(default_factory=list)

    @field_validator("timeline")
    @classmethod
    def _sorted(cls, v: list[TimelineEntry]) -> list[TimelineEntry]:
        return sorted(v, key=timeline_order)

    # -- change algebra ------------------------------------------------------

    def state(self) -> "Policy":
        """The current sections without the timeline (and without the run settings, which never change during a run)."""
        return self.model_copy(update={"timeline": [], "run": None}, deep=True)

    def apply(self, change: Change) -> "Policy":
        """Return a new policy (timeline untouched) with ``change`` applied."""
        try:
            merged = Policy.model_validate(self._merged(change))
        except ValidationError as err:
            raise PolicyError(format_validation_error(err, "change")) from None
        return merged.model_copy(update={"timeline": self.timeline})

    def _merged(self, change: Change) -> dict[str, Any]:
        """The sections (no timeline) as plain data with ``change`` merged in, not yet validated."""
        data = self.model_dump(mode="json", exclude={"timeline"})
        if change.freeze:
            data["freeze"] = without_overridden_decisions(data["freeze"] + [r.model_dump(mode="json", exclude_none=True) for r in change.freeze])
        for key, value in change.set.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = _deep_merge(data[key], value)
            else:
                data[key] = value
        return data

    def at_step(self, step: int) -> "Policy":
        """The sections in force at ``step`` (all timeline entries with entry.step <= step applied)."""
        p = self.state()
        for e in self.timeline:
            if e.step is not None and e.step <= step:
                p = p.apply(e)
        return p


    # -- YAML ----------------------------------------------------------------

    def to_yaml(self) -> str:
        """Sections: only what differs from the defaults, so a file says what the user chose.

        ``run:`` is written in full, so a replay does not depend on the defaults of a later version.
        """
        head: dict[str, Any] = {"spu_policy": POLICY_VERSION}
        if self.run is not None:
            head["run"] = self.run.model_dump(mode="json")
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=True, exclude={"run", "spu_policy"})
        data["timeline"] = [_entry_data(e) for e in self.timeline]
        if not data["timeline"]:
            del data["timeline"]
        text = yaml.safe_dump(head, sort_keys=False, default_flow_style=False, width=100)  # one run setting a line
        return text + (yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100) if data else "")


def _entry_data(entry: TimelineEntry) -> dict[str, Any]:
    """An entry as the file writes it: when it happens first, then what it does."""
    data = entry.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    return {**{k: data.pop(k) for k in ("step", "at", "when", "once", "after_step") if k in data}, **data}


def timeline_order(entry: TimelineEntry) -> tuple[bool, int]:
    """Step entries by step, then the triggers in the order given (their step is not known before they fire)."""
    return entry.step is None, entry.step or 0


def without_overridden_decisions(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The freeze rules less those automatic freezing wrote that later rules override wherever they select.

    LISA and autofreeze decide whole blocks again at every decision; kept, their rules would pile up (a set per
    decision, all checked again at every change).  A rule goes only when later rules name all its blocks or all its
    units (whatever they set, the last match wins), so what trains is unchanged.  The first marked rule stays: it
    marks where the rules that take units out of automatic freezing begin (``auto_freeze._pinned``)."""
    first = next((i for i, r in enumerate(rules) if r.get("by") == "auto_freeze"), None)
    if first is None:
        return rules
    layers_after: set[int] = set()
    units_after: set[str] = set()
    dropped: set[int] = set()
    for i in range(len(rules) - 1, first, -1):
        r = rules[i]
        layers, units = r.get("layers"), r.get("units")
        if r.get("match") is None:
            if r.get("by") == "auto_freeze" and ((layers is not None and set(layers) <= layers_after) or (units is not None and set(units) <= units_after)):
                dropped.add(i)
            elif units is None:
                layers_after |= set(layers or ())
            elif layers is None:
                units_after |= set(units)
    return [r for i, r in enumerate(rules) if i not in dropped]


def _deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def format_validation_error(err: ValidationError, source: str, prefix: str = "") -> str:
    """One line per error naming the key path (``prefix`` + the path inside the validated data) and the value."""
    lines = [f"{source}: invalid policy"]
    for e in err.errors():
        loc = prefix + key_path(tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))))
        msg = error_text(e)
        if e["type"] == "extra_forbidden":
            parent = loc.rsplit(".", 1)[0] if "." in loc else "(top level)"
            lines.append(f"  {loc}: unknown key (not allowed in {parent})")
            continue
        value = e.get("input")
        shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def undo_change(before: Policy, now: Policy) -> Change:
    """The change that puts back the sections of ``before`` where ``now`` differs (only what differs, so it merges)."""
    old, new = before.model_dump(mode="json"), now.model_dump(mode="json")
    return Change(set={section: _differing(old[section], new[section]) for section in SECTIONS if old[section] != new[section]})


def _differing(old: Any, now: Any) -> Any:
    """The part of ``old`` that differs from ``now`` (mappings by key; anything else whole)."""
    if isinstance(old, dict) and isinstance(now, dict):
        return {k: _differing(v, now.get(k)) for k, v in old.items() if v != now.get(k)}
    return old
