"""The console's sections and their fields: the methods' from the registry, the core ones (learning rates) here.

Each method's section (its title, fields and status line) is its ``SectionSpec`` in
``spu_engine.methods.registry``; the console names no method.  A field names where
its value lives in the policy (section and path), its widget id and its label.
Whether it is a choice (a ``Literal`` or a ``bool``) or a number (``int`` /
``float``), its default, its allowed range and the checks across fields are read
from the pydantic models the engine validates with, so the console can never
disagree with the engine about them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Any, Literal, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError

from spu_engine.core.policy import LearningRates, Memory, Policy
from spu_engine.core.validation import error_text
from spu_engine.methods import registry
from spu_engine.methods.spec import ConsoleField, SectionSpec, Stage

LEARNING_RATES = SectionSpec(
    "lr",
    LearningRates,
    title="Learning rates",
    fields=(ConsoleField("decay", "lr-decay", "layer decay"), ConsoleField("warm_in", "lr-warm-in", "warm-in")),
)

MEMORY = SectionSpec(
    "memory",
    Memory,
    title="Memory",
    fields=(
        ConsoleField("grad_accum", "mem-grad-accum", "grad accum"),
        ConsoleField("gradient_checkpointing", "mem-checkpointing", "grad ckpt"),
    ),
)


def console_sections() -> dict[str, SectionSpec]:
    """The sections the controls show, in order: the registry's method sections in policy order, the learning rates
    before the methods whose decisions change what trains (they write freeze rules, listed right after them)."""
    deciding = {spec.section for spec in registry.SPECS if spec.stage is Stage.DECIDES_TRAINING}
    methods = registry.section_specs()
    return {
        **{name: spec for name, spec in methods.items() if name not in deciding},
        LEARNING_RATES.name: LEARNING_RATES,
        **{name: spec for name, spec in methods.items() if name in deciding},
        MEMORY.name: MEMORY,
    }


CONSOLE_SECTIONS = console_sections()
TITLES = {name: spec.title for name, spec in CONSOLE_SECTIONS.items()}


def section_model(section: str) -> type[BaseModel]:
    return CONSOLE_SECTIONS[section].settings


@dataclass(frozen=True)
class ControlField:
    """One field; a number the policy may leave unset (``int | None``) shows empty, with ``unset`` as its placeholder
    (what the engine does then: "run's end", "run's lr")."""

    section: str  # the policy section
    path: str  # where in the section, dotted: "schedule.final_sparsity"
    id: str  # the widget's id
    label: str
    unset: str = ""

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
        """The field's type; ``int`` for ``int | None`` (``optional`` says it may be left empty)."""
        annotation = self.owner.model_fields[self.name].annotation
        if get_origin(annotation) is UnionType:
            return next(a for a in get_args(annotation) if a is not NoneType)
        return annotation

    @property
    def optional(self) -> bool:
        annotation = self.owner.model_fields[self.name].annotation
        return get_origin(annotation) is UnionType and NoneType in get_args(annotation)

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
        if value is None:
            return ""
        if self.annotation is bool:
            return "on" if value else "off"
        return str(value)

    def parsed(self, text: str) -> Any:
        """The policy's value from the widget's text (ValueError for a number that is not one)."""
        if self.annotation is bool:
            return text == "on"
        if self.optional and not text.strip():
            return None
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


def fields_from(sections: dict[str, SectionSpec]) -> list[ControlField]:
    """Every section's fields, in order, as the controls show them."""
    return [ControlField(name, f.path, f.id, f.label, f.unset) for name, spec in sections.items() for f in spec.fields]


FIELDS = fields_from(CONSOLE_SECTIONS)
FIELD_BY_ID = {f.id: f for f in FIELDS}


def fields_of(section: str) -> list[ControlField]:
    return [f for f in FIELDS if f.section == section]


def section_values(section: str, text_of: Callable[[ControlField], str]) -> dict[str, Any]:
    """The section's values as the policy nests them, from each field's text; only those its method reads (a LoRA
    change carries no AdaLoRA ranks, so its event, log line and exported timeline entry hold what it does)."""
    values: dict[str, Any] = {}
    for f in fields_of(section):
        if f.optional and not text_of(f).strip():  # left empty: the engine's own default (the run's end, its lr)
            continue
        *parents, name = f.path.split(".")
        into = values
        for key in parents:
            into = into.setdefault(key, {})
        into[name] = f.parsed(text_of(f))
    return section_model(section).applicable(values)


def section_problem(section: str, values: dict[str, Any]) -> str | None:
    """Checks across fields (e.g. end_step >= start_step), by the engine's own model of the section."""
    try:
        section_model(section).model_validate(values)
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or section
        return f"{where}: {error_text(e)}"
    return None
