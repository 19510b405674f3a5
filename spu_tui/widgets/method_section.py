"""One section's controls: the fields its spec lists (``control_fields``: the registry's, or the console's for lr).

Each field is a choice or a number that validates as you type, with the
message the engine's own model would give.  An edit first asks the engine what
it *would* do (``PreviewRequested``; the answer goes on the what-if line), and
``enter`` in a field or the *apply* button asks for the change
(``ApplyRequested``); the status line then follows the command until the
engine's ack arrives.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.message import Message
from textual.validation import ValidationResult, Validator
from textual.widget import Widget
from textual.widgets import Button, Input, Label, Static

from spu_engine.core.memory_view import memory_line
from spu_engine.core.policy import Change, Policy
from spu_engine.core.protocol import PreviewEvent
from spu_tui.widgets.choice import Choice
from spu_tui.widgets.control_fields import (
    FIELD_BY_ID,
    TITLES,
    ControlField,
    fields_of,
    section_model,
    section_problem,
    section_values,
)
from spu_tui.widgets.line import Line
from spu_tui.widgets.unit_tree import short_count


class SectionChange(Message):
    """A ``change`` made in controls section ``section`` (where its answer is shown)."""

    def __init__(self, section: str, change: Change) -> None:
        super().__init__()
        self.section = section
        self.change = change


class ApplyRequested(SectionChange):
    """Apply the change at the next step boundary."""


class PreviewRequested(SectionChange):
    """Ask the engine what the change would do; nothing changes."""


class FieldValidator(Validator):
    """Check one numeric field with the pydantic model that the engine uses."""

    def __init__(self, field: ControlField) -> None:
        super().__init__()
        self.field = field

    def validate(self, value: str) -> ValidationResult:
        problem = self.field.problem(value)
        return self.success() if problem is None else self.failure(problem)


def set_status(line: Line, text: str, kind: str) -> None:
    """A section's status line; kind: hint | in-flight | ok | error."""
    line.say(text, f"status -{kind}")


class MethodSection(Vertical):
    """The fields of policy section ``section``, then ``extra`` widgets (what else the section shows or takes), the
    what-if line, the apply button and the status line."""

    def __init__(self, section: str, *extra: Widget) -> None:
        super().__init__(classes="section", id=f"sec-{section}")
        self.section = section
        self.fields = fields_of(section)
        self.extra = extra
        self.engine_values: dict[str, str] = {}  # widget id -> the value the engine has

    def compose(self) -> ComposeResult:
        yield Static(TITLES[self.section], classes="section-title")
        with Grid(classes="fields"):  # each label beside its field: two columns, one widget fewer a field than rows
            for f in self.fields:
                yield Label(f.label, id=f"label-{f.id}")
                if f.choices is not None:
                    yield Choice(f.choices, f.default, id=f.id)
                else:
                    yield Input(
                        f.default,
                        placeholder=f.unset,
                        validators=[FieldValidator(f)],
                        validate_on=["changed", "submitted"],
                        compact=True,
                        id=f.id,
                    )
        yield from self.extra
        yield Line("", classes="whatif", id=f"whatif-{self.section}")
        yield Button("apply", compact=True, classes="apply", id=f"apply-{self.section}")
        yield Line("", classes="status", id=f"status-{self.section}")

    # -- down: what the engine says

    def load(self, policy: Policy, force: bool = False) -> None:
        """Show the engine's values (fields being edited are left alone unless ``force``: a refusal)."""
        self.engine_values = {f.id: f.value_in(policy) for f in self.fields}
        for wid, value in self.engine_values.items():
            widget = self.query_one(f"#{wid}")
            if not force and (widget.has_focus or getattr(widget, "expanded", False)):
                continue
            if isinstance(widget, (Choice, Input)) and str(widget.value) != value:
                widget.value = value
        self.show_applicable()

    def show_applicable(self) -> None:
        """Only the fields the chosen method reads (LoRA's form shows no adapter size, no AdaLoRA ranks)."""
        top = [f for f in self.fields if "." not in f.path]
        kept = section_model(self.section).applicable({f.path: str(self.query_one(f"#{f.id}").value) for f in top})  # type: ignore[attr-defined]
        for f in top:
            shown = f.path in kept
            self.query_one(f"#label-{f.id}").display = self.query_one(f"#{f.id}").display = shown

    def show_preview(self, preview: PreviewEvent) -> None:
        """The engine's answer to a preview: what applying the edited section would do."""
        line = self.query_one(f"#whatif-{self.section}", Line)
        if preview.error:
            line.say(f"would be refused: {preview.error}", "whatif -error")
            return
        share = preview.trainable / preview.total if preview.trainable is not None and preview.total else 0.0
        trainable = f"{short_count(preview.trainable_now or 0)} → {short_count(preview.trainable or 0)} ({share:.1%})"
        parts = [f"→ trainable {trainable}"]
        parts.append(
            f"backward ≈ {preview.backward:.0%}"
            if preview.backward is not None
            else f"backward ≤ {preview.frozen_prefix_backward:.0%}"
        )
        if preview.sparsity:
            parts.append(f"sparsity → {preview.sparsity:.0%} (no compute saved)")
        text = Text("; ".join(parts))
        if preview.memory is not None:  # the memory a step would hold, and a flag when it would not fit
            figures, _, flag = memory_line(preview.memory).partition("\n")
            text.append(f"\n{figures}")
            if flag:
                text.append(f"\n{flag}", style="bold red")
        for note in preview.notes:
            text.append(f"\n  {note}")
        line.say(text, "whatif")

    def clear_preview(self) -> None:
        self.query_one(f"#whatif-{self.section}", Line).say("")

    def set_status(self, text: str, kind: str) -> None:
        set_status(self.query_one(f"#status-{self.section}", Line), text, kind)

    def acknowledged(self, ok: bool, step: int, message: str) -> None:
        """The engine answered a change of this section (its values loaded already); a field still being edited
        keeps its own message."""
        self.clear_preview()
        if not ok:
            self.set_status(f"refused: {message}", "error")
        elif problem := self.field_problem():
            self.set_status(f"applied at step {step}; {problem}", "error")
        else:
            self.set_status(f"applied at step {step}", "ok")

    # -- up: the user asks for a change

    def on_mount(self) -> None:
        self.show_applicable()

    def on_choice_changed(self, event: Choice.Changed) -> None:
        self.show_applicable()
        engine_value = self.engine_values.get(event.choice.id or "")
        if engine_value is not None and str(event.value) != engine_value:
            self.set_status("edited: apply (or enter in a field) applies", "hint")
            self._preview()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == f"apply-{self.section}":
            self._request()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id in FIELD_BY_ID:  # the section's own fields (others are for the panel)
            event.stop()
            self._request()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id not in FIELD_BY_ID:
            return
        if event.validation_result and not event.validation_result.is_valid:
            self.set_status(event.validation_result.failure_descriptions[0], "error")
        elif event.value.strip() != self.engine_values.get(event.input.id, event.value.strip()):
            self.set_status("edited: enter applies", "hint")
            self._preview()
        else:  # valid and as the engine has it: whatever the last keystroke said is gone
            self.set_status("", "hint")
            self.clear_preview()

    def _preview(self) -> None:
        if self.field_problem() is None and section_problem(self.section, values := self.values()) is None:
            self.post_message(PreviewRequested(self.section, Change(set={self.section: values})))

    def field_problem(self) -> str | None:
        """The first invalid numeric field, as the validator words it."""
        for f in self.fields:
            if f.choices is None and (problem := f.problem(self.query_one(f"#{f.id}", Input).value)):
                return problem
        return None

    def _request(self) -> None:
        problem = self.field_problem() or section_problem(self.section, self.values())
        if problem:
            self.set_status(problem, "error")
            return
        self.post_message(ApplyRequested(self.section, Change(set={self.section: self.values()})))
        if isinstance(self.screen.focused, Input):  # out of the field: the keys act again, the place is kept
            self.query_one(f"#apply-{self.section}").focus()

    def values(self) -> dict[str, Any]:
        return section_values(self.section, lambda f: str(self.query_one(f"#{f.id}").value))  # type: ignore[attr-defined]
