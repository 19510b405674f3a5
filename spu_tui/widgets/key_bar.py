"""A one-line key bar that always fits: it falls back to short labels before it would cut a key.  In a text field
the letters type, so there it says how to leave the field instead."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Input

KEYS = [
    ("space", "toggle", "␣", "toggle"),
    ("f", "freeze ≤ cursor", "f", "frz≤"),
    ("u", "unfreeze > cursor", "u", "unfrz>"),
    ("p", "pause/resume", "p", "pause"),
    ("e", "export", "e", "exp"),
    ("s", "checkpoint", "s", "save"),
    ("r", "evaluate", "r", "eval"),
    ("z", "undo", "z", "undo"),
    ("?", "help", "?", "help"),
    ("q", "quit", "q", "quit"),
]

IN_FIELD = [
    ("esc", "leave the field (the keys act again)", "esc", "leave field"),
    ("enter", "apply / add", "⏎", "apply"),
    ("tab", "next field", "tab", "next"),
]


class KeyBar(Widget):
    DEFAULT_CSS = "KeyBar { height: 1; background: $panel; }"

    in_field: reactive[bool] = reactive(False)  # a text field has the focus: letters type into it

    def on_mount(self) -> None:
        self.watch(self.screen, "focused", self._focus_moved)

    def _focus_moved(self, focused: Widget | None) -> None:
        self.in_field = isinstance(focused, Input)

    def render(self) -> Text:
        width = self.size.width
        for short in (False, True):
            text = Text()
            for key, label, short_key, short_label in IN_FIELD if self.in_field else KEYS:
                if short:
                    text.append(short_key, style="bold reverse")
                    text.append(f" {short_label} ")
                else:
                    text.append(f" {key} ", style="bold reverse")
                    text.append(f" {label}  ")
            if text.cell_len <= width:
                return text
        text.truncate(width)
        return text
