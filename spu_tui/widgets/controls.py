"""Method controls: selective backprop, weight-update skipping, pruning, PEFT, distillation, learning rates.

Inputs validate as you type against the policy's own pydantic models, so the
message names the field and its allowed range exactly as the engine would.
An edit first asks the engine what it *would* do (a what-if line: trainable
parameters, backward compute kept, notes); ``enter`` in a field or the
section's *apply* button applies it, and the section says it is sent, then
queued, until the engine's ack arrives.  A refused change puts the fields back
to the engine's values.  The freeze rules in force are listed, and any one can
be removed; so are the learning-rate rules (a rule typed as one YAML mapping is
added, previewed first), the timeline entries still to come and the triggers (each
with the steps it fired at), and a trigger typed as one YAML mapping is added.
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.validation import ValidationResult, Validator
from textual.widgets import Button, Input, Label, ListItem, ListView, Select, Static

from spu_engine.policy import SECTIONS, Change, FreezeRule, Policy, PolicyError, ScaleRule, Selector, TimelineEntry
from spu_engine.policy_files import entry_from_text, scale_rule_from_text
from spu_engine.protocol import PreviewEvent

from ..run_model import Aspect, RunModel, describe_change
from .control_fields import FIELD_BY_ID, FIELDS, TITLES, ControlField, fields_of, section_problem, section_values
from .unit_tree import short_count


class FieldValidator(Validator):
    """Check one numeric field with the pydantic model that the engine uses."""

    def __init__(self, field: ControlField) -> None:
        super().__init__()
        self.field = field

    def validate(self, value: str) -> ValidationResult:
        problem = self.field.problem(value)
        return self.success() if problem is None else self.failure(problem)


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


class ScaleRuleList(RuleList):
    """The learning-rate rules in force, last match wins; ``delete`` or ``x`` asks to remove the highlighted one."""

    class RemoveRequested(RuleList.RemoveRequested):
        pass


class ScaleRuleValidator(Validator):
    """Check a typed learning-rate rule with the engine's own parser."""

    def validate(self, value: str) -> ValidationResult:
        if not value.strip():
            return self.success()
        try:
            scale_rule_from_text(value)
        except PolicyError as exc:
            return self.failure(str(exc))
        return self.success()


class EntryValidator(Validator):
    """Check a typed trigger with the engine's own parser: one line naming the key."""

    def validate(self, value: str) -> ValidationResult:
        if not value.strip():
            return self.success()
        try:
            entry_from_text(value)
        except PolicyError as exc:
            return self.failure(str(exc))
        return self.success()


class ScheduleList(ListView):
    """Timeline entries still to come and the triggers; ``delete`` or ``x`` asks to remove the highlighted one."""

    BINDINGS = [Binding("delete,x", "remove_entry", "remove")]

    class RemoveRequested(Message):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

    def action_remove_entry(self) -> None:
        if self.index is not None and isinstance(self.highlighted_child, RuleItem):
            self.post_message(self.RemoveRequested(self.index))


TRIGGER_FORMS = "step: N | at: {epoch: N} (from 0) | when: {metric: eval_loss, below_best_by: 0.01}, once: false; then freeze: [...] and/or set: {...}"


class SectionChange(Message):
    """A ``change`` made in controls section ``section`` (where its answer is shown)."""

    def __init__(self, section: str, change: Change) -> None:
        super().__init__()
        self.section = section
        self.change = change


class EntryMessage(Message):
    """A timeline entry or trigger, as the protocol carries it."""

    def __init__(self, entry: dict[str, Any]) -> None:
        super().__init__()
        self.entry = entry


class ControlsPanel(VerticalScroll, can_focus=False):
    """The fields are focus stops; the panel itself is not (tab goes tree -> first field)."""

    WATCHES = (Aspect.POLICY,)

    class ApplyRequested(SectionChange):
        """Apply the change at the next step boundary."""

    class PreviewRequested(SectionChange):
        """Ask the engine what the change would do; nothing changes."""

    class ScheduleRequested(EntryMessage):
        """Add a timeline entry or a trigger."""

    class UnscheduleRequested(EntryMessage):
        """Remove a pending entry or a trigger, as the engine listed it."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.engine_values: dict[str, str] = {}  # widget id -> the value the engine has
        self.rules: list[FreezeRule] = []  # the freeze rules in force, as the engine last said
        self.scale_rules: list[ScaleRule] | None = None  # the learning-rate rules in force, as the engine last said
        self.scheduled: list[dict[str, Any]] = []  # pending entries and triggers, as the engine last said

    def compose(self) -> ComposeResult:
        for section, title in TITLES.items():
            with Vertical(classes="section", id=f"sec-{section}"):
                yield Static(title, classes="section-title")
                for f in fields_of(section):
                    with Horizontal(classes="field"):
                        yield Label(f.label)
                        if f.choices is not None:
                            yield Select([(o, o) for o in f.choices], value=f.default, allow_blank=False, compact=True, id=f.id)
                        else:
                            yield Input(f.default, validators=[FieldValidator(f)], validate_on=["changed", "submitted"], compact=True, id=f.id)
                if section == "weight_update_skipping":
                    yield Static("", classes="phase", id="wus-phase")
                if section == "lr":
                    yield ScaleRuleList(id="lr-rules")
                    yield Input(placeholder="layers: 0-1, scale: 0.5", validators=[ScaleRuleValidator()], validate_on=["changed", "submitted"],
                                compact=True, id="lr-rule-new")
                yield Static("", classes="whatif", id=f"whatif-{section}")
                yield Button("apply", compact=True, classes="apply", id=f"apply-{section}")
                yield Static("", classes="status", id=f"status-{section}")
        with Vertical(classes="section", id="sec-freeze"):
            yield Static("Freeze rules (last match wins; x removes)", classes="section-title")
            yield RuleList(id="rules")
            yield Static("", classes="status", id="status-freeze")
        with Vertical(classes="section", id="sec-triggers"):
            yield Static("Timeline and triggers (x removes; ✓ fired; enter adds)", classes="section-title")
            yield ScheduleList(id="scheduled")
            yield Input(
                placeholder="at: {epoch: 2}, freeze: [{units: [embeddings], trainable: false}]", validators=[EntryValidator()],
                validate_on=["changed", "submitted"], compact=True, id="trigger-new",
            )
            yield Static(TRIGGER_FORMS, classes="whatif")
            yield Static("", classes="status", id="status-triggers")

    # -- down: the screen tells us what the engine says --------------------------

    def show(self, state: RunModel) -> None:
        if state.policy:
            self.load(state.policy)
        self._show_scheduled(state.scheduled)

    def _show_scheduled(self, entries: list[dict[str, Any]]) -> None:
        if entries == self.scheduled and self.query_one(ScheduleList).children:
            return
        self.scheduled = entries
        view = self.query_one(ScheduleList)
        view.clear()
        if entries:
            view.extend(RuleItem(describe_entry(e)) for e in entries)
            view.call_after_refresh(setattr, view, "index", min(view.index or 0, len(entries) - 1))
        else:
            view.append(ListItem(Label("none: nothing scheduled")))

    def load(self, policy: dict[str, Any], force: bool = False) -> None:
        """Show the engine's current values (fields being edited are left alone unless ``force``: a refusal)."""
        pol = Policy.model_validate({k: v for k, v in policy.items() if k in SECTIONS})
        self.engine_values = {f.id: f.value_in(pol) for f in FIELDS}
        for wid, value in self.engine_values.items():
            widget = self.query_one(f"#{wid}")
            if not force and (widget.has_focus or getattr(widget, "expanded", False)):
                continue
            if isinstance(widget, (Select, Input)) and str(widget.value) != value:
                widget.value = value
        wus = pol.weight_update_skipping
        phase = wus.phase or wus.start_phase
        what = "every trainable tensor" if phase == "full" else "biases only" + (f" of the last {wus.last_k_blocks} blocks" if wus.last_k_blocks else "")
        self.query_one("#wus-phase", Static).update(f"phase now: {phase}, trains {what}" if wus.enabled else f"off; first phase when on: {wus.start_phase}")
        self._show_rules(list(pol.freeze))
        self._show_scale_rules(list(pol.lr.scale))

    def _show_scale_rules(self, rules: list[ScaleRule]) -> None:
        if rules == self.scale_rules:
            return
        self.scale_rules = rules
        view = self.query_one("#lr-rules", ScaleRuleList)
        view.clear()
        if rules:
            view.extend(RuleItem(f"{i}: x{r.scale:g} {describe_selector(r)}") for i, r in enumerate(rules))
            view.call_after_refresh(setattr, view, "index", min(view.index or 0, len(rules) - 1))
        else:
            view.append(ListItem(Label("no rule: every tensor at the decay's factor")))

    def _show_rules(self, rules: list[FreezeRule]) -> None:
        if rules == self.rules:
            return
        self.rules = rules
        view = self.query_one("#rules", RuleList)
        view.clear()
        if rules:
            view.extend(RuleItem(f"{i}: {describe_rule(r)}") for i, r in enumerate(rules))
            view.call_after_refresh(setattr, view, "index", min(view.index or 0, len(rules) - 1))
        else:
            view.append(ListItem(Label("none: every tensor trains (methods may gate)")))

    def show_preview(self, section: str, preview: PreviewEvent) -> None:
        """The engine's answer to a preview: what applying the edited section would do."""
        line = self.query_one(f"#whatif-{section}", Static)
        if preview.error:
            line.update(f"would be refused: {preview.error}")
            line.set_classes("whatif -error")
            return
        share = preview.trainable / preview.total if preview.trainable is not None and preview.total else 0.0
        parts = [f"→ trainable {short_count(preview.trainable_now or 0)} → {short_count(preview.trainable or 0)} ({share:.1%})"]
        parts.append(f"backward ≈ {preview.backward:.0%}" if preview.backward is not None else f"backward ≤ {preview.frozen_prefix_backward:.0%}")
        if preview.sparsity:
            parts.append(f"sparsity → {preview.sparsity:.0%} (no compute saved)")
        line.update("; ".join(parts) + "".join(f"\n  {note}" for note in preview.notes))
        line.set_classes("whatif")

    def change_sent(self, section: str) -> None:
        self._set_status(section, f"sent: {_title(section)}", "in-flight")

    def change_received(self, section: str) -> None:
        self._set_status(section, f"queued: {_title(section)} applies at the next step boundary", "in-flight")

    def acknowledged(self, section: str, ok: bool, step: int, message: str, policy: dict[str, Any]) -> None:
        """The engine answered a change of ``section``; a field still being edited keeps its own message."""
        self.load(policy, force=not ok)  # a refused change: every field shows what the engine has again
        if section in TITLES:
            self.query_one(f"#whatif-{section}", Static).update("")
        if not ok:
            self._set_status(section, f"refused: {message}", "error")
            return
        if section == "lr":  # a typed rule that applied: the field is free for the next
            field = self.query_one("#lr-rule-new", Input)
            with field.prevent(Input.Changed):
                field.value = ""
        problem = self._field_problem(section)
        if problem:
            self._set_status(section, f"applied at step {step}; {problem}", "error")
        else:
            self._set_status(section, f"applied at step {step}", "ok")

    def schedule_answered(self, added: bool, ok: bool, message: str) -> None:
        """The engine's answer to adding or removing an entry; an added one leaves the field empty for the next."""
        self._set_status("triggers", message if ok else f"refused: {message}", "ok" if ok else "error")
        if ok and added:
            field = self.query_one("#trigger-new", Input)
            with field.prevent(Input.Changed):  # the answer stays on the status line
                field.value = ""

    def _set_status(self, section: str, text: str, kind: str) -> None:
        """kind: hint | in-flight | ok | error."""
        status = self.query_one(f"#status-{section}", Static)
        status.update(text)
        status.set_classes(f"status -{kind}")

    # -- up: the user asks for a change ----------------------------------------

    def on_select_changed(self, event: Select.Changed) -> None:
        engine_value = self.engine_values.get(event.select.id or "")
        if engine_value is not None and str(event.value) != engine_value:
            section = FIELD_BY_ID[event.select.id or ""].section
            self._set_status(section, "edited: apply (or enter in a field) applies", "hint")
            self._preview(section)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id and event.button.id.startswith("apply-"):
            self._request(event.button.id.removeprefix("apply-"))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id == "trigger-new":
            self._schedule(event.value)
        elif event.input.id == "lr-rule-new":
            change = self._scale_rule_change(event.value)
            if change is not None:
                self.post_message(self.ApplyRequested("lr", change))
        elif event.input.id:
            self._request(FIELD_BY_ID[event.input.id].section)

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "trigger-new":
            problem = event.validation_result and not event.validation_result.is_valid and event.validation_result.failure_descriptions[0]
            self._set_status("triggers", problem or ("enter adds it" if event.value.strip() else ""), "error" if problem else "hint")
            return
        if event.input.id == "lr-rule-new":
            problem = event.validation_result and not event.validation_result.is_valid and event.validation_result.failure_descriptions[0]
            self._set_status("lr", problem or ("enter adds it (it overrides earlier rules for what it selects)" if event.value.strip() else ""),
                             "error" if problem else "hint")
            if not problem and (change := self._scale_rule_change(event.value, quiet=True)) is not None:
                self.post_message(self.PreviewRequested("lr", change))
            return
        if event.input.id is None:
            return
        section = FIELD_BY_ID[event.input.id].section
        if event.validation_result and not event.validation_result.is_valid:
            self._set_status(section, event.validation_result.failure_descriptions[0], "error")
        elif event.value.strip() != self.engine_values.get(event.input.id, event.value.strip()):
            self._set_status(section, "edited: enter applies", "hint")
            self._preview(section)
        else:  # valid and as the engine has it: whatever the last keystroke said is gone
            self._set_status(section, "", "hint")
            self.query_one(f"#whatif-{section}", Static).update("")

    def on_rule_list_remove_requested(self, message: RuleList.RemoveRequested) -> None:
        message.stop()
        if 0 <= message.index < len(self.rules):
            kept = [r.model_dump(mode="json", exclude_none=True) for i, r in enumerate(self.rules) if i != message.index]
            self.post_message(self.ApplyRequested("freeze", Change(set={"freeze": kept})))

    def on_scale_rule_list_remove_requested(self, message: ScaleRuleList.RemoveRequested) -> None:
        message.stop()
        rules = self.scale_rules or []
        if 0 <= message.index < len(rules):
            kept = [r.model_dump(mode="json", exclude_none=True) for i, r in enumerate(rules) if i != message.index]
            self.post_message(self.ApplyRequested("lr", Change(set={"lr": {"scale": kept}})))

    def _scale_rule_change(self, text: str, quiet: bool = False) -> Change | None:
        """The change that appends the typed rule to the learning-rate rules in force (None, said unless ``quiet``, if it is none)."""
        if not text.strip():
            return None
        try:
            rule = scale_rule_from_text(text)
        except PolicyError as exc:
            if not quiet:
                self._set_status("lr", str(exc), "error")
            return None
        rules = [r.model_dump(mode="json", exclude_none=True) for r in [*(self.scale_rules or []), rule]]
        return Change(set={"lr": {"scale": rules}})

    def on_schedule_list_remove_requested(self, message: ScheduleList.RemoveRequested) -> None:
        message.stop()
        if 0 <= message.index < len(self.scheduled):
            self.post_message(self.UnscheduleRequested(self.scheduled[message.index]))

    def _schedule(self, text: str) -> None:
        if not text.strip():
            self._set_status("triggers", f"type an entry first: {TRIGGER_FORMS}", "error")
            return
        try:
            entry = entry_from_text(text)
        except PolicyError as exc:
            self._set_status("triggers", str(exc), "error")
            return
        self.post_message(self.ScheduleRequested(entry.model_dump(mode="json", exclude_none=True, exclude_defaults=True)))

    def _preview(self, section: str) -> None:
        if self._field_problem(section) is None and section_problem(section, values := self._values(section)) is None:
            self.post_message(self.PreviewRequested(section, Change(set={section: values})))

    def _field_problem(self, section: str) -> str | None:
        """The first invalid numeric field of ``section``, as the validator words it."""
        for f in fields_of(section):
            if f.choices is None and (problem := f.problem(self.query_one(f"#{f.id}", Input).value)):
                return problem
        return None

    def _request(self, section: str) -> None:
        problem = self._field_problem(section) or section_problem(section, self._values(section))
        if problem:
            self._set_status(section, problem, "error")
            return
        self.post_message(self.ApplyRequested(section, Change(set={section: self._values(section)})))

    def _values(self, section: str) -> dict[str, Any]:
        return section_values(section, lambda f: str(self.query_one(f"#{f.id}").value))  # type: ignore[attr-defined]


def _title(section: str) -> str:
    return TITLES.get(section) or {"freeze": "freeze rules", "triggers": "trigger change"}[section]


def describe_entry(data: dict[str, Any]) -> str:
    """``epoch 2: freeze embeddings  ✓ fired at step 16``: when, what, and where it fired."""
    entry = TimelineEntry.model_validate(data)
    fired = f"  ✓ fired at step{'s' if len(entry.fired) > 1 else ''} {', '.join(map(str, entry.fired))}" if entry.fired else ""
    return f"{entry.moment()}: {describe_change(data)}{fired}"


def describe_selector(rule: Selector) -> str:
    what = []
    if rule.units:
        what.append(", ".join(rule.units))
    if rule.layers is not None:
        what.append(f"layers {rule.layers}")
    if rule.match:
        what.append(rule.match)
    return " & ".join(what)


def describe_rule(rule: FreezeRule) -> str:
    return f"{'train' if rule.trainable else 'freeze'} {describe_selector(rule)}" + (" (auto)" if rule.by else "")
