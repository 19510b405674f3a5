"""A choice among a few words, in one widget.

Textual's ``Select`` is five widgets (the control, its current value, two labels and a hidden list); the controls
hold seventeen choices, and every widget on screen costs at each layout, each style update and each key a test
presses.  ``Choice`` draws ``value ▼`` on one row and lists the options in a small picker screen over it only while
the user chooses: enter, space or down opens it, enter picks, esc keeps the value.  Setting ``value`` posts
``Choice.Changed`` as ``Select`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.geometry import Offset
from textual.message import Message
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import OptionList


class ChoicePicker(ModalScreen[str | None]):
    """The options, under the choice they set; dismisses with the option picked (None: esc or a click outside)."""

    DEFAULT_CSS = """
    ChoicePicker { background: transparent; align: left top; }
    ChoicePicker > OptionList, ChoicePicker > OptionList:focus {
        position: absolute; width: auto; min-width: 12; height: auto; max-height: 12;
        scrollbar-size-vertical: 1; border: round $accent;
    }
    """
    BINDINGS = [Binding("escape", "dismiss(None)", "keep", show=False)]

    def __init__(self, options: Sequence[str], current: str, at: Offset) -> None:
        super().__init__()
        self.options = options
        self.current = current
        self.at = at

    def compose(self) -> ComposeResult:
        listed = OptionList(*self.options)
        listed.styles.offset = (self.at.x, self.at.y)
        if self.current in self.options:
            listed.highlighted = list(self.options).index(self.current)
        yield listed

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(str(event.option.prompt))

    def on_click(self, event: events.Click) -> None:
        if self.get_widget_at(event.screen_x, event.screen_y)[0] is self:
            self.dismiss(None)


class Choice(Widget, can_focus=True):
    """One of ``options``; ``expanded`` while its picker is open."""

    DEFAULT_CSS = "Choice { height: 1; width: 1fr; }"
    BINDINGS = [Binding("enter,space,down", "open", "choose", show=False)]

    value: reactive[str] = reactive("", init=False)

    class Changed(Message):
        """The value changed (by the user or by code), as ``Select.Changed``."""

        def __init__(self, choice: Choice, value: str) -> None:
            super().__init__()
            self.choice = choice
            self.value = value

        @property
        def control(self) -> Choice:
            return self.choice

    def __init__(self, options: Sequence[str], value: str, **kwargs) -> None:
        super().__init__(**kwargs)
        if value not in options:
            raise ValueError(f"{value!r} is not one of {list(options)}")
        self.options = tuple(options)
        self.set_reactive(Choice.value, value)
        self.expanded = False

    def render(self) -> Content:
        width = max(len(self.value) + 2, self.content_size.width)
        return Content(f"{self.value:<{width - 2}} ▼")

    def watch_value(self, value: str) -> None:
        self.post_message(self.Changed(self, value))

    def validate_value(self, value: object) -> str:
        if str(value) not in self.options:
            raise ValueError(f"{value!r} is not one of {list(self.options)}")
        return str(value)

    def action_open(self) -> None:
        """The picker opens under the choice, or over it where the screen ends first."""
        below = Offset(self.region.x, self.region.y + 1)
        rows = min(len(self.options), 10) + 2
        at = below if below.y + rows <= self.screen.size.height else Offset(below.x, max(0, below.y - 1 - rows))
        self.expanded = True
        self.app.push_screen(ChoicePicker(self.options, self.value, at), self._picked)

    def _picked(self, picked: str | None) -> None:
        self.expanded = False
        if picked is not None:
            self.value = picked
        self.focus()

    def on_click(self) -> None:
        self.action_open()
