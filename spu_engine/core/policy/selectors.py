"""Selecting parameters by block, unit or name glob: freeze rules and learning-rate scale rules."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, StrictBool, field_validator, model_validator

from spu_engine.core.validation import Section

_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:-|\.\.)\s*(-?\d+)\s*$")


class Selector(Section):
    """Select parameters by block index, unit name and/or name glob (all given selectors must match)."""

    kind: ClassVar[str] = "rule"

    match: str | None = Field(None, description="glob over parameter names, e.g. '*.bias' or '*attention*'")
    layers: list[int] | None = Field(
        None, description="block indices; YAML may also say '0-3'. Negative counts from the end."
    )
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
    def _needs_selector(self) -> Selector:
        if self.match is None and self.layers is None and self.units is None:
            raise ValueError(f"a {self.kind} needs at least one of 'match', 'layers', 'units'")
        return self


class FreezeRule(Selector):
    """Whether the selected parameters train."""

    kind: ClassVar[str] = "freeze rule"

    trainable: StrictBool
    by: Literal["auto_freeze"] | None = Field(
        None,
        description="written by the engine on the rules automatic freezing decided; a rule without it that follows one "
        "takes the units it selects out of automatic freezing",
    )


class ScaleRule(Selector):
    """A learning-rate multiplier for the selected parameters."""

    kind: ClassVar[str] = "scale rule"

    scale: float = Field(
        gt=0.0, le=1000.0, description="multiplies the schedule's learning rate (freeze a tensor instead of 0)"
    )
