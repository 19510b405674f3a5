"""Method controls: one section for each method section the registry lists, and the learning rates.

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
Each method is a ``MethodSection``; each list a ``RemovableList``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.validation import ValidationResult, Validator
from textual.widget import Widget
from textual.widgets import Input, Static

from spu_engine.core.policy import SECTIONS, Change, FreezeRule, Policy, PolicyError, ScaleRule, Selector, TimelineEntry
from spu_engine.core.policy_files import entry_from_text, scale_rule_from_text
from spu_engine.core.protocol import PreviewEvent
from spu_tui.run_model import Aspect, RunModel, describe_change
from spu_tui.widgets.control_fields import CONSOLE_SECTIONS, TITLES
from spu_tui.widgets.line import Line
from spu_tui.widgets.method_section import ApplyRequested, MethodSection, PreviewRequested, set_status
from spu_tui.widgets.removable_list import RemovableList

TRIGGER_FORMS = (
    "step: N | at: {epoch: N} (from 0) | when: {metric: eval_loss, below_best_by: 0.01}, once: false; "
    "then freeze: [...] and/or set: {...}"
)


class ParsedBy(Validator):
    """Check typed text with one of the engine's own parsers (an empty field is no error)."""

    def __init__(self, parse: Callable[[str], object]) -> None:
        super().__init__()
        self.parse = parse

    def validate(self, value: str) -> ValidationResult:
        if not value.strip():
            return self.success()
        try:
            self.parse(value)
        except PolicyError as exc:
            return self.failure(str(exc))
        return self.success()


class EntryMessage(Message):
    """A timeline entry or trigger, as the protocol carries it."""

    def __init__(self, entry: dict[str, Any]) -> None:
        super().__init__()
        self.entry = entry


class ControlsPanel(VerticalScroll, can_focus=False):
    """The fields are focus stops; the panel itself is not (tab goes tree -> first field).  The sections post
    ``ApplyRequested`` and ``PreviewRequested`` (so do the freeze and learning-rate rules); the triggers post these."""

    WATCHES = (Aspect.POLICY,)

    class ScheduleRequested(EntryMessage):
        """Add a timeline entry or a trigger."""

    class UnscheduleRequested(EntryMessage):
        """Remove a pending entry or a trigger, as the engine listed it."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rules: list[FreezeRule] = []  # the freeze rules in force, as the engine last said
        self.scale_rules: list[ScaleRule] = []  # the learning-rate rules in force, as the engine last said
        self.scheduled: list[dict[str, Any]] = []  # pending entries and triggers, as the engine last said
        self._loaded: dict[str, Any] | None = None  # the policy's sections as last shown
        # held, not queried: a query walks the panel's ~140 widgets, and the engine's answers reach here at every toggle
        self._now = {
            name: Line("", classes="now", id=f"now-{name}")
            for name in TITLES
            if CONSOLE_SECTIONS[name].status is not None
        }
        self._lr_rules = RemovableList("no rule: every tensor at the decay's factor", id="lr-rules")
        self._sections = {name: MethodSection(name, *self._extra(name)) for name in TITLES}
        self._rules = RemovableList("none: every tensor trains (methods may gate)", id="rules")
        self._scheduled = RemovableList("none: nothing scheduled", id="scheduled")

    def compose(self) -> ComposeResult:
        yield from self._sections.values()
        with Vertical(classes="section", id="sec-freeze"):
            yield Static("Freeze rules (last match wins; x removes)", classes="section-title")
            yield self._rules
            yield Line("", classes="status", id="status-freeze")
        with Vertical(classes="section", id="sec-triggers"):
            yield Static("Timeline and triggers (x removes; ✓ fired; enter adds)", classes="section-title")
            yield self._scheduled
            yield Input(
                placeholder="at: {epoch: 2}, freeze: [{units: [embeddings], trainable: false}]",
                validators=[ParsedBy(entry_from_text)],
                validate_on=["changed", "submitted"],
                compact=True,
                id="trigger-new",
            )
            yield Static(TRIGGER_FORMS, classes="whatif")
            yield Line("", classes="status", id="status-triggers")

    def _extra(self, section: str) -> list[Widget]:
        """What a section shows besides its fields: its status line if its spec has one (what its settings do now),
        the learning-rate rules."""
        extra: list[Widget] = [self._now[section]] if section in self._now else []
        if section == "lr":
            extra += [
                self._lr_rules,
                Input(
                    placeholder="layers: 0-1, scale: 0.5",
                    validators=[ParsedBy(scale_rule_from_text)],
                    validate_on=["changed", "submitted"],
                    compact=True,
                    id="lr-rule-new",
                ),
            ]
        return extra

    def section(self, section: str) -> MethodSection:
        return self._sections[section]

    @property
    def engine_values(self) -> dict[str, str]:
        """Widget id -> the value the engine has, for every method field."""
        return {wid: value for s in self._sections.values() for wid, value in s.engine_values.items()}

    # -- down: the screen tells us what the engine says --------------------------

    def show(self, state: RunModel) -> None:
        if state.policy:
            self.load(state.policy)
        self.scheduled = state.scheduled
        self._scheduled.show([describe_entry(e) for e in self.scheduled])

    def load(self, policy: dict[str, Any], force: bool = False) -> None:
        """Show the engine's current values of the sections that changed since the last load (every section with
        ``force``: a refusal, whose fields being edited go back too; otherwise those are left alone).  A freeze
        toggle touches the freeze rules only, not the fifty method fields."""
        sections = {k: v for k, v in policy.items() if k in SECTIONS}
        loaded = self._loaded
        changed = (
            set(SECTIONS) if force or loaded is None else {k for k in SECTIONS if sections.get(k) != loaded.get(k)}
        )
        if not changed:
            return
        self._loaded = sections
        pol = Policy.model_validate(sections)
        for name in changed & self._sections.keys():
            self._sections[name].load(pol, force)
            if (status := CONSOLE_SECTIONS[name].status) is not None:
                self._now[name].say(status(getattr(pol, name)))
        self.rules = list(pol.freeze)
        self._rules.show([f"{i}: {describe_rule(r)}" for i, r in enumerate(self.rules)])
        self.scale_rules = list(pol.lr.scale)
        self._lr_rules.show([f"{i}: x{r.scale:g} {describe_selector(r)}" for i, r in enumerate(self.scale_rules)])

    def show_preview(self, section: str, preview: PreviewEvent) -> None:
        """The engine's answer to a preview: what applying the edited section would do."""
        self.section(section).show_preview(preview)

    def change_sent(self, section: str) -> None:
        self._set_status(section, f"sent: {_title(section)}", "in-flight")

    def change_received(self, section: str) -> None:
        self._set_status(section, f"queued: {_title(section)} applies at the next step boundary", "in-flight")

    def acknowledged(self, section: str, ok: bool, step: int, message: str, policy: dict[str, Any]) -> None:
        """The engine answered a change of ``section``; a field still being edited keeps its own message."""
        self.load(policy, force=not ok)  # a refused change: every field shows what the engine has again
        if ok and section == "lr":  # a typed rule that applied: the field is free for the next
            field = self.query_one("#lr-rule-new", Input)
            with field.prevent(Input.Changed):
                field.value = ""
        if section in TITLES:
            self.section(section).acknowledged(ok, step, message)
        else:
            said = f"applied at step {step}" if ok else f"refused: {message}"
            self._set_status(section, said, "ok" if ok else "error")

    def schedule_answered(self, added: bool, ok: bool, message: str) -> None:
        """The engine's answer to adding or removing an entry; an added one leaves the field empty for the next."""
        self._set_status("triggers", message if ok else f"refused: {message}", "ok" if ok else "error")
        if ok and added:
            field = self.query_one("#trigger-new", Input)
            with field.prevent(Input.Changed):  # the answer stays on the status line
                field.value = ""

    def _set_status(self, section: str, text: str, kind: str) -> None:
        """kind: hint | in-flight | ok | error."""
        set_status(self.query_one(f"#status-{section}", Line), text, kind)

    # -- up: the user asks for a change (the method sections' own fields ask for themselves) -------------

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        """A field's whole section comes into view with it (its title, what-if and apply), where the panel has room."""
        section = next((a for a in event.widget.ancestors if isinstance(a, Widget) and a.has_class("section")), None)
        if section is not None and section.outer_size.height <= self.scrollable_content_region.height:
            self.call_after_refresh(self.scroll_to_widget, section, animate=False)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id == "trigger-new" and self._schedule(event.value):
            self.query_one("#scheduled").focus()  # out of the field: the keys act again, and the list shows the entry
        elif event.input.id == "lr-rule-new" and (change := self._scale_rule_change(event.value)) is not None:
            self.post_message(ApplyRequested("lr", change))
            self.query_one("#lr-rules").focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id not in ("trigger-new", "lr-rule-new"):
            return
        result = event.validation_result
        problem = result is not None and not result.is_valid and result.failure_descriptions[0]
        if event.input.id == "trigger-new":
            hint = "enter adds it" if event.value.strip() else ""
            self._set_status("triggers", problem or hint, "error" if problem else "hint")
            return
        hint = "enter adds it (it overrides earlier rules for what it selects)" if event.value.strip() else ""
        self._set_status("lr", problem or hint, "error" if problem else "hint")
        if not problem and (change := self._scale_rule_change(event.value, quiet=True)) is not None:
            self.post_message(PreviewRequested("lr", change))

    def on_removable_list_remove_requested(self, message: RemovableList.RemoveRequested) -> None:
        message.stop()
        which, index = message.removable_list.id, message.index
        if which == "rules" and 0 <= index < len(self.rules):
            self.post_message(ApplyRequested("freeze", Change(set={"freeze": _without(self.rules, index)})))
        elif which == "lr-rules" and 0 <= index < len(self.scale_rules):
            self.post_message(ApplyRequested("lr", Change(set={"lr": {"scale": _without(self.scale_rules, index)}})))
        elif which == "scheduled" and 0 <= index < len(self.scheduled):
            self.post_message(self.UnscheduleRequested(self.scheduled[index]))

    def _scale_rule_change(self, text: str, quiet: bool = False) -> Change | None:
        """The change that appends the typed rule to the learning-rate rules in force (None, said unless ``quiet``,
        if it is none)."""
        if not text.strip():
            return None
        try:
            rule = scale_rule_from_text(text)
        except PolicyError as exc:
            if not quiet:
                self._set_status("lr", str(exc), "error")
            return None
        rules = [r.model_dump(mode="json", exclude_none=True) for r in [*self.scale_rules, rule]]
        return Change(set={"lr": {"scale": rules}})

    def _schedule(self, text: str) -> bool:
        """Ask for the typed entry; False (said on the status line) when it is none."""
        if not text.strip():
            self._set_status("triggers", f"type an entry first: {TRIGGER_FORMS}", "error")
            return False
        try:
            entry = entry_from_text(text)
        except PolicyError as exc:
            self._set_status("triggers", str(exc), "error")
            return False
        self.post_message(
            self.ScheduleRequested(entry.model_dump(mode="json", exclude_none=True, exclude_defaults=True))
        )
        return True


def _without(rules: list[FreezeRule] | list[ScaleRule], index: int) -> list[dict[str, Any]]:
    """The rules in force but the one at ``index``, as the policy carries them."""
    return [r.model_dump(mode="json", exclude_none=True) for i, r in enumerate(rules) if i != index]


def _title(section: str) -> str:
    return TITLES.get(section) or {"freeze": "freeze rules", "triggers": "trigger change"}[section]


def describe_entry(data: dict[str, Any]) -> str:
    """``epoch 2: freeze embeddings  ✓ fired at step 16``: when, what, and where it fired."""
    entry = TimelineEntry.model_validate(data)
    fired = (
        f"  ✓ fired at step{'s' if len(entry.fired) > 1 else ''} {', '.join(map(str, entry.fired))}"
        if entry.fired
        else ""
    )
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
