"""The method controls' one table of fields; all else about a field comes from the policy's own models.

A field names where its value lives in the policy (section and path), its
widget id and its label.  Whether it is a choice (a ``Literal`` or a ``bool``)
or a number (``int`` / ``float``), its default, its allowed range and the
checks across fields are read from the pydantic models the engine validates
with, so the console can never disagree with the engine about them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError

from spu_engine.core.policy import Policy
from spu_engine.core.validation import error_text

TITLES = {
    "selective_backprop": "Selective backprop",
    "weight_update_skipping": "Weight-update skipping",
    "pruning": "Pruning",
    "peft": "PEFT",
    "distillation": "Distillation",
    "lr": "Learning rates",
    "auto_freeze": "Automatic freezing",
}


def section_model(section: str) -> type[BaseModel]:
    return Policy.model_fields[section].annotation  # type: ignore[return-value]


@dataclass(frozen=True)
class ControlField:
    section: str  # the policy section
    path: str  # where in the section, dotted: "schedule.final_sparsity"
    id: str  # the widget's id
    label: str

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def owner(self) -> type[BaseModel]:
        """The model that declares the field: the section's, or one nested in it."""
        model = section_model(self.section)
        for key in self.path.split(".")[:-1]:
            model = model.model_fields[key].annotation  # type: ignore[assignment]
        return model

    @property
    def annotation(self) -> Any:
        return self.owner.model_fields[self.name].annotation

    @property
    def choices(self) -> list[str] | None:
        """The values a choice offers; None for a number."""
        if self.annotation is bool:
            return ["off", "on"]
        if get_origin(self.annotation) is Literal:
            return [str(option) for option in get_args(self.annotation)]
        return None

    @property
    def default(self) -> str:
        return self.shown(self.owner.model_fields[self.name].default)

    def shown(self, value: Any) -> str:
        if self.annotation is bool:
            return "on" if value else "off"
        return str(value)

    def parsed(self, text: str) -> Any:
        """The policy's value from the widget's text (ValueError for a number that is not one)."""
        if self.annotation is bool:
            return text == "on"
        if self.annotation in (int, float):
            return self.annotation(text.strip())
        return text

    def value_in(self, policy: Policy) -> str:
        value: Any = getattr(policy, self.section)
        for key in self.path.split("."):
            value = getattr(value, key)
        return self.shown(value)

    def allowed(self) -> str:
        """'0 < keep <= 1' from the field's constraints."""
        low = high = ""
        for c in self.owner.model_fields[self.name].metadata:
            if isinstance(c, Ge):
                low = f"{c.ge} <= "
            elif isinstance(c, Gt):
                low = f"{c.gt} < "
            elif isinstance(c, Le):
                high = f" <= {c.le}"
            elif isinstance(c, Lt):
                high = f" < {c.lt}"
        return f"{low}{self.name}{high}" if low or high else self.name

    def problem(self, text: str) -> str | None:
        """Why ``text`` is no value for this number, worded with its allowed range; None when it is one."""
        kind = "a whole number" if self.annotation is int else "a number"
        try:
            number = self.parsed(text)
        except ValueError:
            return f"{self.name}: {text!r} is not {kind}; allowed {self.allowed()}"
        try:
            self.owner.model_validate({self.name: number})
        except ValidationError:
            return f"{self.name}: {number} is out of range; allowed {self.allowed()}"
        return None


FIELDS = [
    ControlField("selective_backprop", "mode", "sb-mode", "mode"),
    ControlField("selective_backprop", "threshold", "sb-threshold", "threshold"),
    ControlField("selective_backprop", "keep", "sb-keep", "keep"),
    ControlField("weight_update_skipping", "enabled", "wus-enabled", "enabled"),
    ControlField("weight_update_skipping", "start_phase", "wus-start", "start phase"),
    ControlField("weight_update_skipping", "patience", "wus-patience", "patience"),
    ControlField("pruning", "method", "pr-method", "method"),
    ControlField("pruning", "scope", "pr-scope", "scope"),
    ControlField("pruning", "structure", "pr-structure", "structure"),
    ControlField("pruning", "schedule.final_sparsity", "pr-target", "target"),
    ControlField("pruning", "schedule.start_step", "pr-start", "start step"),
    ControlField("pruning", "schedule.end_step", "pr-end", "end step"),
    ControlField("peft", "method", "peft-method", "method"),
    ControlField("peft", "use_dora", "peft-dora", "DoRA"),
    ControlField("peft", "use_rslora", "peft-rslora", "rsLoRA"),
    ControlField("peft", "init", "peft-init", "init"),
    ControlField("peft", "lr_ratio", "peft-ratio", "LoRA+ B/A lr"),
    ControlField("peft", "init_r", "peft-init-r", "AdaLoRA init r"),
    ControlField("peft", "target_r", "peft-target-r", "AdaLoRA target r"),
    ControlField("distillation", "enabled", "kd-enabled", "enabled"),
    ControlField("distillation", "teacher", "kd-teacher", "teacher"),
    ControlField("distillation", "alpha", "kd-alpha", "alpha"),
    ControlField("distillation", "temperature", "kd-temperature", "temperature"),
    ControlField("lr", "decay", "lr-decay", "layer decay"),
    ControlField("lr", "warm_in", "lr-warm-in", "warm-in steps"),
    ControlField("auto_freeze", "method", "af-method", "method"),
    ControlField("auto_freeze", "interval", "af-interval", "interval"),
    ControlField("auto_freeze", "n_layers", "af-layers", "lisa layers"),
    ControlField("auto_freeze", "embeddings", "af-embeddings", "lisa embeddings"),
    ControlField("auto_freeze", "head", "af-head", "lisa head"),
    ControlField("auto_freeze", "percentile", "af-percentile", "percentile"),
    ControlField("auto_freeze", "allow_gaps", "af-gaps", "allow gaps"),
    ControlField("auto_freeze", "optimizer_state", "af-optimizer", "AdamW state"),
]
FIELD_BY_ID = {f.id: f for f in FIELDS}


def fields_of(section: str) -> list[ControlField]:
    return [f for f in FIELDS if f.section == section]


def section_values(section: str, text_of: Callable[[ControlField], str]) -> dict[str, Any]:
    """The section's values as the policy nests them, from each field's text."""
    values: dict[str, Any] = {}
    for f in fields_of(section):
        *parents, name = f.path.split(".")
        into = values
        for key in parents:
            into = into.setdefault(key, {})
        into[name] = f.parsed(text_of(f))
    return values


def section_problem(section: str, values: dict[str, Any]) -> str | None:
    """Checks across fields (e.g. end_step >= start_step), by the engine's own model of the section."""
    try:
        section_model(section).model_validate(values)
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or section
        return f"{where}: {error_text(e)}"
    return None
