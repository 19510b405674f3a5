"""Timeline and log: every change with its step; engine errors in red.

Lines are wrapped to the panel's width; after a resize the whole history is
re-wrapped (the run state keeps it), so nothing is cut off at any size.  That
re-wrap of up to 2000 lines takes about half a second on a busy machine, and
a terminal being resized sends a resize every few milliseconds: done at each,
the screen lagged seconds behind with the old layout's leftovers.  So the
re-wrap waits until the size has held for ``REWRAP_AFTER`` seconds; the new
layout is drawn at once, the log's lines cut at its new width until then.

A new line moves only the log's scroll range: RichLog sets ``virtual_size``, a reactive that lays out the whole
screen (279 widgets at 200x50, most of a toggle's console CPU, issue 30), while the panel's box comes from the
layout, never from its lines; a layout is asked for only when a scrollbar appears or goes.
"""

from __future__ import annotations

from rich.text import Text
from textual.geometry import Size
from textual.reactive import Reactive
from textual.timer import Timer
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
REWRAP_AFTER = 0.3  # seconds a new width must hold before the history is wrapped to it


class LogPanel(RichLog):
    WATCHES = (Aspect.LOG,)
    virtual_size = Reactive(Size(0, 0), layout=False)  # see the module's docstring

    def watch_virtual_size(self, size: Size) -> None:
        bars = (self.show_vertical_scrollbar, self.show_horizontal_scrollbar)
        self._refresh_scrollbars()
        if (self.show_vertical_scrollbar, self.show_horizontal_scrollbar) != bars:
            self.refresh(layout=True)
        else:
            self._scroll_update(size)

    def __init__(self, **kwargs) -> None:
        super().__init__(wrap=True, markup=False, highlight=False, min_width=20, max_lines=MAX_LINES, **kwargs)
        self.lines_source: list[LogLine] = []
        self.shown = 0
        self._width = 0  # the width the lines were wrapped to (0: none yet)
        self._rewrap_timer: Timer | None = None

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
        if not self._width:  # the first size: wrap now
            self.rewrap()
            return
        if self._rewrap_timer is not None:
            self._rewrap_timer.stop()
        self._rewrap_timer = self.set_timer(REWRAP_AFTER, self.rewrap)

    def rewrap(self) -> None:
        """Wrap the history to the width now, if it changed (and write what is new)."""
        if self._rewrap_timer is not None:
            self._rewrap_timer.stop()
            self._rewrap_timer = None
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
