"""Small terminals show one panel at a time: this line says which, and the keys for the others."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

SHORT_TITLES = {"Sparsity": "Spars", "Learning": "Learn", "Controls": "Ctrl"}


class PanelBar(Widget):
    DEFAULT_CSS = "PanelBar { height: 1; }"

    active: reactive[str] = reactive("")

    def __init__(self, panels: list[tuple[str, str]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.panels = panels

    def render(self) -> Text:
        for short in (False, True):
            text = Text()
            for i, (pid, title) in enumerate(self.panels):
                shown = SHORT_TITLES.get(title, title) if short else title
                text.append(f"{i + 1} {shown}", style="bold reverse" if pid == self.active else "dim")
                text.append(" ")
            if text.cell_len <= self.size.width:
                break
        return text
