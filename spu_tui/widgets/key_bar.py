"""A one-line key bar that always fits: it falls back to short labels before it would cut a key."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

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


class KeyBar(Widget):
    DEFAULT_CSS = "KeyBar { height: 1; background: $panel; }"

    def render(self) -> Text:
        width = self.size.width
        for short in (False, True):
            text = Text()
            for key, label, short_key, short_label in KEYS:
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
