"""A log line moves only the log's scroll range: it never lays out the whole screen (issue 30: each policy event's
line reflowed every widget of the console, most of a toggle's CPU)."""

from __future__ import annotations

from rich.text import Text
from textual.app import App, ComposeResult
from textual.containers import Vertical
from textual.widgets import Button

from spu_tui.widgets.log_panel import LogPanel


class Crowded(App):
    """Fifty widgets beside the log, as the console's controls are."""

    def compose(self) -> ComposeResult:
        with Vertical():
            for i in range(50):
                yield Button(f"field {i}")
        yield LogPanel()


async def test_log_lines_scroll_without_laying_out_the_screen():
    app = Crowded()
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.pause(0.2)
        log = app.query_one(LogPanel)
        layouts: list[int] = []
        lay_out = app.screen._refresh_layout
        app.screen._refresh_layout = lambda *a, **k: layouts.append(1) or lay_out(*a, **k)
        for i in range(60):
            log.write(Text(f"line {i}"))
            await pilot.pause(0.01)
        await pilot.pause(0.2)
        assert len(layouts) <= 1  # at most once, when the scrollbar appears
        assert log.show_vertical_scrollbar and len(log.lines) == 60
        assert log.scroll_y == log.max_scroll_y > 0  # it follows the newest line
