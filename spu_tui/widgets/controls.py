"""Method controls: selective backprop, weight-update skipping, pruning, PEFT.

Inputs validate as you type against the policy's own pydantic models, so the
message names the field and its allowed range exactly as the engine would.
An edit first asks the engine what it *would* do (a what-if line: trainable
parameters, backward compute kept, notes); ``enter`` in a field or the
section's *apply* button applies it, and the section shows *pending* until the
engine's ack arrives.  A refused change puts the fields back to the engine's
values.  The freeze rules in force are listed, and any one can be removed.
"""

from __future__ import annotations

from typing import Any, Callable

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.validation import ValidationResult, Validator
from textual.binding import Binding
from textual.widgets import Button, Input, Label, ListItem, ListView, Select, Static

from spu_engine.policy import SECTIONS, Peft, Policy, Pruning, PruningSchedule, SelectiveBackprop, WeightUpdateSkipping

from .unit_tree import short_count


def allowed_range(model: type[BaseModel], field: str) -> str:
    """'0 < keep <= 1' from the field's constraints."""
    low = high = ""
    for c in model.model_fields[field].metadata:
        if isinstance(c, Ge):
            low = f"{c.ge} <= "
        elif isinstance(c, Gt):
            low = f"{c.gt} < "
        elif isinstance(c, Le):
            high = f" <= {c.le}"
        elif isinstance(c, Lt):
            high = f" < {c.lt}"
    return f"{low}{field}{high}" if low or high else field


class FieldValidator(Validator):
    """Check one numeric field with the pydantic model that the engine uses."""

    def __init__(self, model: type[BaseModel], field: str, cast: Callable[[str], Any]) -> None:
        super().__init__()
        self.model, self.field, self.cast = model, field, cast

    def validate(self, value: str) -> ValidationResult:
        kind = "a whole number" if self.cast is int else "a number"
        try:
            number = self.cast(value.strip())
        except ValueError:
            return self.failure(f"{self.field}: {value!r} is not {kind}; allowed {allowed_range(self.model, self.field)}")
        try:
            self.model.model_validate({self.field: number})
        except ValidationError:
            return self.failure(f"{self.field}: {number} is out of range; allowed {allowed_range(self.model, self.field)}")
        return self.success()


# (section, field id, label, model, pydantic field, cast) for every numeric input
NUMBERS = [
    ("selective_backprop", "sb-threshold", "threshold", SelectiveBackprop, "threshold", float),
    ("selective_backprop", "sb-keep", "keep", SelectiveBackprop, "keep", float),
    ("weight_update_skipping", "wus-patience", "patience", WeightUpdateSkipping, "patience", int),
    ("pruning", "pr-target", "target", PruningSchedule, "final_sparsity", float),
    ("pruning", "pr-start", "start step", PruningSchedule, "start_step", int),
    ("pruning", "pr-end", "end step", PruningSchedule, "end_step", int),
]
CHOICES = [
    ("selective_backprop", "sb-mode", "mode", ["off", "threshold", "percentile"]),
    ("weight_update_skipping", "wus-enabled", "enabled", ["off", "on"]),
    ("weight_update_skipping", "wus-start", "start phase", ["full", "bias_only"]),
    ("pruning", "pr-method", "method", ["none", "magnitude", "imp", "movement", "soft_movement"]),
    ("pruning", "pr-scope", "scope", ["global", "per_unit", "per_layer"]),
    ("pruning", "pr-structure", "structure", ["weights", "heads_neurons"]),
    ("peft", "peft-method", "method", ["none", "bitfit", "adapter", "ia3", "lora"]),
]
TITLES = {
    "selective_backprop": "Selective backprop",
    "weight_update_skipping": "Weight-update skipping",
    "pruning": "Pruning",
    "peft": "PEFT",
}


class RuleList(ListView):
    """The freeze rules in force, last match wins; ``delete`` or ``x`` asks to remove the highlighted one."""

    BINDINGS = [Binding("delete,x", "remove_rule", "remove rule")]

    class RemoveRequested(Message):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

    def action_remove_rule(self) -> None:
        if self.index is not None and self.children and isinstance(self.highlighted_child, RuleItem):
            self.post_message(self.RemoveRequested(self.index))


class RuleItem(ListItem):
    def __init__(self, text: str) -> None:
        super().__init__(Label(text))


class ControlsPanel(VerticalScroll, can_focus=False):
    """The fields are focus stops; the panel itself is not (tab goes tree -> first field)."""

    class ApplyRequested(Message):
        """Merge ``values`` into policy section ``section`` at the next step boundary."""

        def __init__(self, section: str, values: Any) -> None:
            super().__init__()
            self.section = section
            self.values = values

    class PreviewRequested(Message):
        """Ask the engine what merging ``values`` into ``section`` would do (nothing changes)."""

        def __init__(self, section: str, values: Any) -> None:
            super().__init__()
            self.section = section
            self.values = values

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.engine_values: dict[str, str] = {}  # widget id -> the value the engine has
        self.rules: list[dict[str, Any]] = []  # the freeze rules in force, as the engine last said

    def compose(self) -> ComposeResult:
        for section, title in TITLES.items():
            with Vertical(classes="section", id=f"sec-{section}"):
                yield Static(title, classes="section-title")
                for sec, wid, label, options in CHOICES:
                    if sec == section:
                        with Horizontal(classes="field"):
                            yield Label(label)
                            yield Select([(o, o) for o in options], value=options[0], allow_blank=False, compact=True, id=wid)
                for sec, wid, label, model, field, cast in NUMBERS:
                    if sec == section:
                        with Horizontal(classes="field"):
                            yield Label(label)
                            yield Input(
                                str(model.model_fields[field].default),
                                validators=[FieldValidator(model, field, cast)],
                                validate_on=["changed", "submitted"],
                                compact=True,
                                id=wid,
                            )
                if section == "weight_update_skipping":
                    yield Static("", classes="phase", id="wus-phase")
                yield Static("", classes="whatif", id=f"whatif-{section}")
                yield Button("apply", compact=True, classes="apply", id=f"apply-{section}")
                yield Static("", classes="status", id=f"status-{section}")
        with Vertical(classes="section", id="sec-freeze"):
            yield Static("Freeze rules (last match wins; x removes)", classes="section-title")
            yield RuleList(id="rules")
            yield Static("", classes="status", id="status-freeze")

    # -- down: the app tells us what the engine says --------------------------

    def load(self, policy: dict[str, Any], force: bool = False) -> None:
        """Show the engine's current values (fields being edited are left alone unless ``force``: a refusal)."""
        pol = Policy.model_validate({k: v for k, v in policy.items() if k in SECTIONS})
        sb, wus, pr = pol.selective_backprop, pol.weight_update_skipping, pol.pruning
        values = {
            "sb-mode": sb.mode,
            "sb-threshold": sb.threshold,
            "sb-keep": sb.keep,
            "wus-enabled": "on" if wus.enabled else "off",
            "wus-start": wus.start_phase,
            "wus-patience": wus.patience,
            "pr-method": pr.method,
            "pr-scope": pr.scope,
            "pr-structure": pr.structure,
            "pr-target": pr.schedule.final_sparsity,
            "pr-start": pr.schedule.start_step,
            "pr-end": pr.schedule.end_step,
            "peft-method": pol.peft.method,
        }
        self.engine_values = {wid: str(value) for wid, value in values.items()}
        for wid, value in self.engine_values.items():
            widget = self.query_one(f"#{wid}")
            if not force and (widget.has_focus or getattr(widget, "expanded", False)):
                continue
            if isinstance(widget, (Select, Input)) and str(widget.value) != value:
                widget.value = value
        phase = wus.phase or wus.start_phase
        what = "every trainable tensor" if phase == "full" else "biases only" + (f" of the last {wus.last_k_blocks} blocks" if wus.last_k_blocks else "")
        self.query_one("#wus-phase", Static).update(f"phase now: {phase}, trains {what}" if wus.enabled else f"off; first phase when on: {wus.start_phase}")
        self._show_rules([r.model_dump(mode="json", exclude_none=True) for r in pol.freeze])

    def _show_rules(self, rules: list[dict[str, Any]]) -> None:
        if rules == self.rules:
            return
        self.rules = rules
        view = self.query_one(RuleList)
        view.clear()
        if rules:
            view.extend(RuleItem(f"{i}: {describe_rule(r)}") for i, r in enumerate(rules))
            view.call_after_refresh(setattr, view, "index", min(view.index or 0, len(rules) - 1))
        else:
            view.append(ListItem(Label("none: every tensor trains (methods may gate)")))

    def show_preview(self, section: str, preview: Any) -> None:
        """The engine's answer to a preview: what applying the edited section would do."""
        line = self.query_one(f"#whatif-{section}", Static)
        if preview.error:
            line.update(f"would be refused: {preview.error}")
            line.set_classes("whatif -error")
            return
        share = preview.trainable / preview.total if preview.total else 0.0
        parts = [f"→ trainable {short_count(preview.trainable_now or 0)} → {short_count(preview.trainable or 0)} ({share:.1%})"]
        parts.append(f"backward ≈ {preview.backward:.0%}" if preview.backward is not None else f"backward ≤ {preview.frozen_prefix_backward:.0%}")
        if preview.sparsity:
            parts.append(f"sparsity → {preview.sparsity:.0%} (no compute saved)")
        line.update("; ".join(parts) + "".join(f"\n  {note}" for note in preview.notes))
        line.set_classes("whatif")

    def set_status(self, section: str, text: str, kind: str) -> None:
        """kind: pending | ok | error."""
        status = self.query_one(f"#status-{section}", Static)
        status.update(text)
        status.set_classes(f"status -{kind}")

    # -- up: the user asks for a change ----------------------------------------

    def on_select_changed(self, event: Select.Changed) -> None:
        engine_value = self.engine_values.get(event.select.id or "")
        if engine_value is not None and str(event.value) != engine_value:
            section = self._section_of(event.select.id)
            self.set_status(section, "edited: apply (or enter in a field) applies", "hint")
            self._preview(section)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id and event.button.id.startswith("apply-"):
            self._request(event.button.id.removeprefix("apply-"))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id:
            self._request(self._section_of(event.input.id))

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id is None:
            return
        section = self._section_of(event.input.id)
        if event.validation_result and not event.validation_result.is_valid:
            self.set_status(section, event.validation_result.failure_descriptions[0], "error")
        elif event.value.strip() != self.engine_values.get(event.input.id, event.value.strip()):
            self.set_status(section, "edited: enter applies", "hint")
            self._preview(section)
        else:  # valid and as the engine has it: whatever the last keystroke said is gone
            self.set_status(section, "", "hint")
            self.query_one(f"#whatif-{section}", Static).update("")

    def on_rule_list_remove_requested(self, message: RuleList.RemoveRequested) -> None:
        message.stop()
        if 0 <= message.index < len(self.rules):
            self.post_message(self.ApplyRequested("freeze", [r for i, r in enumerate(self.rules) if i != message.index]))

    def _preview(self, section: str) -> None:
        if self._field_problem(section) is None and _check_section(section, values := self.section_values(section)) is None:
            self.post_message(self.PreviewRequested(section, values))

    @staticmethod
    def _section_of(widget_id: str) -> str:
        for sec, wid, *_ in [*NUMBERS, *CHOICES]:
            if wid == widget_id:
                return sec
        raise KeyError(widget_id)

    def _field_problem(self, section: str) -> str | None:
        """The first invalid numeric field of ``section``, as the validator words it."""
        for sec, wid, *_ in NUMBERS:
            if sec == section:
                field = self.query_one(f"#{wid}", Input)
                result = field.validate(field.value)
                if result is not None and not result.is_valid:
                    return result.failure_descriptions[0]
        return None

    def _request(self, section: str) -> None:
        problem = self._field_problem(section)
        if problem is None:
            problem = _check_section(section, self.section_values(section))
        if problem:
            self.set_status(section, problem, "error")
            return
        self.post_message(self.ApplyRequested(section, self.section_values(section)))

    def acknowledged(self, section: str, ok: bool, step: int, message: str, policy: dict[str, Any]) -> None:
        """The engine answered a change of ``section``; a field still being edited keeps its own message."""
        self.load(policy, force=not ok)  # a refused change: every field shows what the engine has again
        if section in TITLES:
            self.query_one(f"#whatif-{section}", Static).update("")
        if not ok:
            self.set_status(section, f"refused: {message}", "error")
            return
        problem = self._field_problem(section)
        if problem:
            self.set_status(section, f"applied at step {step}; {problem}", "error")
        else:
            self.set_status(section, f"applied at step {step}", "ok")

    def section_values(self, section: str) -> dict[str, Any]:
        def num(wid: str, cast):
            return cast(self.query_one(f"#{wid}", Input).value.strip())

        def choice(wid: str) -> str:
            return str(self.query_one(f"#{wid}", Select).value)

        if section == "selective_backprop":
            return {"mode": choice("sb-mode"), "threshold": num("sb-threshold", float), "keep": num("sb-keep", float)}
        if section == "weight_update_skipping":
            return {"enabled": choice("wus-enabled") == "on", "start_phase": choice("wus-start"), "patience": num("wus-patience", int)}
        if section == "pruning":
            return {
                "method": choice("pr-method"),
                "scope": choice("pr-scope"),
                "structure": choice("pr-structure"),
                "schedule": {"final_sparsity": num("pr-target", float), "start_step": num("pr-start", int), "end_step": num("pr-end", int)},
            }
        return {"method": choice("peft-method")}


def _check_section(section: str, values: dict[str, Any]) -> str | None:
    """Cross-field checks (e.g. end_step >= start_step) with the engine's models."""
    model = {"selective_backprop": SelectiveBackprop, "weight_update_skipping": WeightUpdateSkipping, "pruning": Pruning, "peft": Peft}[section]
    try:
        model.model_validate(values)
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or section
        return f"{where}: {e['msg'].removeprefix('Value error, ')}"
    return None


def describe_rule(rule: dict[str, Any]) -> str:
    what = []
    if rule.get("units"):
        what.append(", ".join(rule["units"]))
    if rule.get("layers") is not None:
        what.append(f"layers {rule['layers']}")
    if rule.get("match"):
        what.append(rule["match"])
    return f"{'train' if rule.get('trainable') else 'freeze'} {' & '.join(what)}"

