"""Timeline and log: every change with its step; engine errors in red.

Lines are wrapped to the panel's width; after a resize the whole history is
re-wrapped (the run state keeps it), so nothing is cut off at any size.  The
re-wrap waits until the new layout is on screen, and writes the history in one
go: a line at a time, 2000 lines took seconds on a busy machine, and the
terminal showed the old layout's leftovers meanwhile.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import RichLog

from spu_tui.run_model import Aspect, LogLine, RunModel

KIND_STYLE = {
    "policy": "magenta",
    "eval": "cyan",
    "state": "blue",
    "checkpoint": "green",
    "export": "green",
    "log": "white",
    "ui": "yellow",
}
MAX_LINES = 2000


class LogPanel(RichLog):
    WATCHES = (Aspect.LOG,)

    def __init__(self, **kwargs) -> None:
        super().__init__(wrap=True, markup=False, highlight=False, min_width=20, max_lines=MAX_LINES, **kwargs)
        self.lines_source: list[LogLine] = []
        self.shown = 0
        self._width = 0
        self._rewrap_due = False

    def show(self, state: RunModel) -> None:
        self.lines_source = state.log
        self._write_new()

    def _write_new(self) -> None:
        """Write the lines not written yet (a hidden log catches up when shown: it has no width to wrap to)."""
        if not self.display or not self.scrollable_content_region.width:
            return
        new = self.lines_source[self.shown :]
        if new:
            self.write(Text("\n").join(_format(line) for line in new))
        self.shown = len(self.lines_source)

    def on_resize(self) -> None:
        if not self._rewrap_due:  # resizes before the next frame are one re-wrap, at the size they end at
            self._rewrap_due = True
            self.call_after_refresh(self.rewrap)

    def rewrap(self) -> None:
        self._rewrap_due = False
        width = self.scrollable_content_region.width
        if width and width != self._width:
            self._width = width
            self.clear()
            self.shown = max(0, len(self.lines_source) - MAX_LINES)
        self._write_new()


def _format(line: LogLine) -> Text:
    text = Text(f"{line.step:>6} ", style="dim")
    text.append(f"{line.kind:<10} ", style="bold red" if line.error else KIND_STYLE.get(line.kind, "white"))
    text.append(line.text, style="red" if line.error else "")
    return text
