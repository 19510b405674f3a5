"""The one place that knows about plotting.

Everything else hands ``Chart`` plain lists (titles and legends live in the
panel border, where they cost no plot rows); swapping textual-plotext for
another plot widget means rewriting this file only.  Bars are drawn as text,
one row a bar with its whole label and value: plotext's bar chart drops x
labels that do not fit beside each other (six bars under five labels at 40
columns) and picks y ticks such as 0.17 / 0.67.  Drawing is deferred until
the chart is painted and only happens when the app calls ``redraw`` with data
that differs from what is on screen.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from itertools import groupby

from plotext._utility import colors_to_ansi
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.geometry import Size
from textual.strip import Strip
from textual.widget import Widget
from textual_plotext import PlotextPlot

from spu_tui.widgets.line import Line

MIN_POINTS = 50  # series are thinned to two points per column (a braille cell is 2 dots wide), never below this


@dataclass
class Series:
    x: list[float]
    y: list[float]
    color: str = "cyan"
    right_axis: bool = False
    marker: str = "braille"


@dataclass
class LineSpec:
    series: list[Series] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)  # vertical lines (policy changes): x, colour
    xlabel: str = "step"
    empty: str = "waiting for the first steps"  # said when no series has a point


@dataclass
class BarSpec:
    """Bars of values in 0..1, shown as percentages."""

    labels: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    color: str = "dark_orange"
    empty: str = "waiting for unit statistics"


class CellPlot(PlotextPlot):
    """A PlotextPlot painted straight from plotext's cell matrix.

    ``PlotextPlot.render`` has plotext write the figure as an ANSI string and
    Rich parse it back; reading the cells skips both, over half of a redraw's CPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self._strips: list[Strip] = []
        self._painted: tuple[Size, str] | None = None  # what _strips were drawn for

    def invalidate(self) -> None:
        """New data: paint again when next shown."""
        self._painted = None
        self.refresh()

    def render_line(self, y: int) -> Strip:
        key = (self.size, self.app.theme)
        if self._painted != key:
            self._strips = self._paint()
            self._painted = key
        return self._strips[y] if y < len(self._strips) else Strip.blank(self.size.width)

    def export_svg(self, title: str) -> str:
        """The plot as drawn on screen, recorded by rich as an SVG (what ``v`` saves)."""
        import io

        from rich.console import Console

        self.render_line(0)  # paints when the data or size changed since the last paint
        console = Console(
            record=True,
            width=max(1, self.size.width),
            file=io.StringIO(),
            force_terminal=True,
            color_system="truecolor",
        )
        for strip in self._strips:
            console.print(Text.assemble(*((seg.text, seg.style) for seg in strip)), end="\n", no_wrap=True, crop=True)
        return console.export_svg(title=title)

    def _paint(self) -> list[Strip]:
        width, height = self.size
        plt = self.plt
        plt.plotsize(width, height)
        plt._set_size(width, height)  # as PlotextPlot.render does (textual-plotext issue 5)
        plt.theme(self._get_plotext_theme_name(self.app.theme))
        plt._set_sizes()
        plt._build_matrix()
        m = plt.monitor.matrix
        strips = []
        for row in reversed(range(m.rows)):
            cells = zip(m.marker[row], m.fullground[row], m.style[row], m.background[row])
            segments = [
                Segment("".join(c[0] for c in run), _style(*colors))
                for colors, run in groupby(cells, key=lambda c: c[1:])
            ]
            strips.append(Strip(segments, m.cols))
        return strips


@functools.cache
def _style(fullground, style, background) -> Style:
    """The Rich style of a plotext (color, style, background) cell: the one plotext would have written as ANSI."""
    text = Text.from_ansi(colors_to_ansi(fullground, style, background) + "x")
    return text.spans[0].style if text.spans else Style.null()


class BarRows(Line):
    """Bars as text: a row each, its label whole, its bar, its value (a panel too short for them scrolls).  New
    values for the same units keep the rows' count: the screen is not laid out again for them (``Line.say``)."""

    DEFAULT_CSS = "BarRows { height: auto; }"

    def draw(self, spec: BarSpec) -> None:
        self.spec = spec
        self.say(self._text(spec, self.size.width))

    def on_resize(self) -> None:
        if hasattr(self, "spec"):
            self.say(self._text(self.spec, self.size.width))

    @staticmethod
    def _text(spec: BarSpec, width: int) -> Text:
        if not spec.labels:
            return Text(spec.empty, style="bright_black")
        label = max(len(name) for name in spec.labels)
        room = max(4, width - label - 7)  # label, space, bar, space, "100%"
        text = Text()
        for i, (name, value) in enumerate(zip(spec.labels, spec.values, strict=True)):
            filled = round(min(1.0, max(0.0, value)) * room)
            text.append(f"{name:<{label}} ")
            text.append("█" * filled, style=spec.color)
            text.append("░" * (room - filled), style="bright_black")
            text.append(f" {value:>4.0%}" + ("\n" if i < len(spec.labels) - 1 else ""))
        return text


class Chart(Widget):
    DEFAULT_CSS = """
    Chart { height: 1fr; }
    Chart.-bars { overflow-y: auto; scrollbar-size-vertical: 1; }
    Chart > CellPlot { height: 1fr; }
    Chart.-bars > CellPlot { display: none; }
    Chart > BarRows { display: none; }
    Chart.-bars > BarRows { display: block; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.plot = CellPlot()
        self.bars = BarRows()
        self._shown: LineSpec | BarSpec | None = None

    def compose(self) -> ComposeResult:
        yield self.plot
        yield self.bars

    def export_svg(self, title: str) -> str:
        """What the chart shows, as an SVG (what ``g`` saves)."""
        if isinstance(self._shown, BarSpec):
            import io

            from rich.console import Console

            console = Console(record=True, width=max(20, self.size.width), file=io.StringIO(), force_terminal=True)
            console.print(BarRows._text(self._shown, max(20, self.size.width)))
            return console.export_svg(title=title)
        return self.plot.export_svg(title)

    def redraw(self, spec: LineSpec | BarSpec) -> None:
        """Hand plotext the data; nothing happens when it is what the chart already shows."""
        if isinstance(spec, LineSpec):
            points = max(MIN_POINTS, 2 * self.plot.size.width)
            spec = LineSpec([_thinned(s, points) for s in spec.series], list(spec.marks), spec.xlabel, spec.empty)
        if spec == self._shown:
            return  # a new size alone repaints by itself (CellPlot.render_line)
        self._shown = spec
        self.set_class(isinstance(spec, BarSpec), "-bars")
        if isinstance(spec, BarSpec):
            self.bars.draw(spec)
            return
        plt = self.plot.plt
        plt.clear_data()
        plt.clear_figure()
        self._lines(plt, spec)
        self.plot.invalidate()

    @staticmethod
    def _lines(plt, spec: LineSpec) -> None:
        drawn = False
        for s in spec.series:
            if not s.x:
                continue
            plt.plot(s.x, s.y, color=s.color, marker=s.marker, yside="right" if s.right_axis else "left")
            drawn = True
        for x, color in spec.marks:
            plt.vline(x, color)
        if not drawn:
            plt.text(spec.empty, 0.5, 0.5, alignment="center")
            plt.xlim(0, 1)
            plt.ylim(0, 1)
        plt.xlabel(spec.xlabel)


def _thinned(s: Series, points: int) -> Series:
    """``s`` with at most about ``points`` points (and always its last one)."""
    if len(s.x) <= points:
        return Series(list(s.x), list(s.y), s.color, s.right_axis, s.marker)
    stride = -(-len(s.x) // points)
    return Series([*list(s.x[::stride]), s.x[-1]], [*list(s.y[::stride]), s.y[-1]], s.color, s.right_axis, s.marker)
