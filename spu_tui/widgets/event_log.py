"""Timeline and log: every change with its step; engine errors in red."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import RichLog

from ..run_state import LogLine

KIND_STYLE = {"policy": "magenta", "eval": "cyan", "state": "blue", "checkpoint": "green", "export": "green", "log": "white", "ui": "yellow"}


class EventLog(RichLog):
    def __init__(self, **kwargs) -> None:
        super().__init__(wrap=True, markup=False, highlight=False, max_lines=2000, **kwargs)
        self.shown = 0

    def show_new(self, lines: list[LogLine]) -> None:
        """Write the lines not written yet (the run state keeps the whole history)."""
        for line in lines[self.shown :]:
            self.add(line)
        self.shown = len(lines)

    def add(self, line: LogLine) -> None:
        text = Text(f"{line.step:>6} ", style="dim")
        text.append(f"{line.kind:<10} ", style="bold red" if line.error else KIND_STYLE.get(line.kind, "white"))
        text.append(line.text, style="red" if line.error else "")
        self.write(text)
