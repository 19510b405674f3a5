"""Changes and the timeline: entries at a step, at an epoch, or when an evaluation metric meets a condition."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any

from pydantic import BaseModel, Field, StrictBool, field_validator, model_validator

from spu_engine.core.policy.sections import SECTIONS
from spu_engine.core.policy.selectors import FreezeRule
from spu_engine.core.validation import Section


class Change(Section):
    """One change: freeze rules to append and/or sections to merge."""

    freeze: list[FreezeRule] = Field(default_factory=list)
    set: dict[str, Any] = Field(default_factory=dict)

    @field_validator("set")
    @classmethod
    def _known_sections(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key not in SECTIONS:
                guess = difflib.get_close_matches(str(key), SECTIONS, n=1, cutoff=0.6)
                hint = f"; did you mean {guess[0]!r}? Sections" if guess else "; sections"
                raise ValueError(f"unknown section {key!r}{hint}: {', '.join(SECTIONS)}")
        return v


class At(Section):
    """A trigger on the clock: at a step (the same as a plain ``step:``) or at the first step of an epoch."""

    step: int | None = Field(
        None, ge=0, description="fires before optimizer step `step` (0-based), as a plain `step:` entry"
    )
    epoch: int | None = Field(
        None,
        ge=0,
        description="fires at the first step of this epoch, counted from 0 as the HF Trainer's state.epoch: `epoch: 2` fires after "
        "two full epochs; an epoch is len(train) // (batch_size * world_size) steps",
    )

    @model_validator(mode="after")
    def _one(self) -> At:
        if (self.step is None) == (self.epoch is None):
            raise ValueError("give exactly one of 'step' or 'epoch', e.g. {epoch: 2}")
        return self


COMPARISONS = {  # key -> how it reads; the value is a number, or a margin (>= 0) against the best value so far
    "below": "<",
    "at_most": "<=",
    "above": ">",
    "at_least": ">=",
    "below_best_by": "< best -",
    "above_best_by": "> best +",
}
_METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")
FRACTIONS = {  # the scores SPU reports as fractions (SQuAD's F1 and exact match too), with their range
    "accuracy": "0-1",
    "f1": "0-1",
    "exact_match": "0-1",
    "top_answer_share": "0-1",
    "mcc": "-1 to 1",
}


class MetricCondition(Section):
    """An evaluation metric compared with a number, or with the best value of the earlier evaluations."""

    metric: str = Field(
        description="a numeric field of the eval events: eval_loss, accuracy (classification), f1 / exact_match (QA), "
        "perplexity (LM, SFT), exact_match (SFT with generate_eval); accuracy, f1 and exact_match are 0-1, never percent"
    )
    below: float | None = Field(None, description="holds when metric < below")
    at_most: float | None = Field(None, description="holds when metric <= at_most")
    above: float | None = Field(None, description="holds when metric > above")
    at_least: float | None = Field(None, description="holds when metric >= at_least")
    below_best_by: float | None = Field(
        None,
        ge=0.0,
        description="holds when metric < (lowest value of the earlier evaluations) - margin; never at the first evaluation",
    )
    above_best_by: float | None = Field(
        None,
        ge=0.0,
        description="holds when metric > (highest value of the earlier evaluations) + margin; never at the first evaluation",
    )

    @field_validator("metric")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _METRIC_NAME.match(v):
            raise ValueError("a metric name is letters, digits, '_' and '.' (at most 64), e.g. eval_loss, accuracy, f1")
        return v

    @model_validator(mode="after")
    def _one_comparison(self) -> MetricCondition:
        given = [k for k in COMPARISONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one comparison of {self.metric!r}: one of {', '.join(COMPARISONS)}"
                + (f" (got {', '.join(given)})" if given else "")
            )
        scale, bound = FRACTIONS.get(self.metric.removeprefix("eval_")), self.comparison[1]
        if scale is not None and abs(bound) > 1:
            raise ValueError(
                f"{self.metric} is on a {scale} scale; {bound:g} looks like a percent: use {bound / 100:g}"
            )
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
        return {"below": value < bound, "at_most": value <= bound, "above": value > bound, "at_least": value >= bound}[
            key
        ]

    def describe(self) -> str:
        key, bound = self.comparison
        return f"{self.metric} {COMPARISONS[key]} {bound:g}"


class TimelineEntry(Change):
    """A change at a step, or a trigger: at an epoch, or when an evaluation metric meets a condition."""

    step: int | None = Field(
        None, ge=0, description="apply before optimizer step `step` (0-based); the same as at: {step: N}"
    )
    at: At | None = Field(
        None, description="{epoch: N}: at the first step of epoch N (from 0); {step: N} is read as step: N"
    )
    when: MetricCondition | None = Field(
        None, description="checked at every evaluation the run schedules (every eval_every steps, and the last)"
    )
    once: StrictBool = Field(
        True,
        description="when-triggers: fire the first time the condition holds (true), or at every evaluation where it holds",
    )
    after_step: int = Field(
        0,
        ge=0,
        description="when-triggers: checked only at evaluations after this step (a trigger added live starts where it was added)",
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
            example = (
                "{epoch: 2} or {step: 300}" if info.field_name == "at" else "{metric: eval_loss, below_best_by: 0.01}"
            )
            raise ValueError(f"a mapping such as {example}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _at_step_is_step(cls, data: Any) -> Any:
        """``at: {step: N}`` is the plain ``step: N`` entry (one form for it everywhere: sorting, export, replay)."""
        if not isinstance(data, dict) or "step" in data:
            return data
        at = data.get("at")
        n = (
            at.get("step")
            if isinstance(at, dict) and set(at) == {"step"}
            else at.step
            if isinstance(at, At) and at.epoch is None
            else None
        )
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            return {**{k: v for k, v in data.items() if k != "at"}, "step": n}
        return data

    @model_validator(mode="after")
    def _one_moment(self) -> TimelineEntry:
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
        return (
            f"when {self.when.describe()}"
            + ("" if self.once else " (every time)")
            + (f" after step {self.after_step}" if self.after_step else "")
        )

    def checked_at(self, step: int) -> bool:
        """Is this when-trigger decided live at the evaluation of ``step`` (not settled by its recorded firings)?"""
        if self.when is None or step <= self.after_step or (self.once and self.fired):
            return False
        return not self.fired or step > self.fired[-1]


def _entry_data(entry: TimelineEntry) -> dict[str, Any]:
    """An entry as the file writes it: when it happens first, then what it does."""
    data = entry.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    return {**{k: data.pop(k) for k in ("step", "at", "when", "once", "after_step") if k in data}, **data}


def timeline_order(entry: TimelineEntry) -> tuple[bool, int]:
    """Step entries by step, then the triggers in the order given (their step is not known before they fire)."""
    return entry.step is None, entry.step or 0
