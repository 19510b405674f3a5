"""The run screen's display: the unit tree beside the panels, each drawing part of the run model.

Data flows one way: engine events -> ``RunModel.apply`` -> revised aspects of
the run -> one frame that draws every visible view watching one of them,
spaced by ``FrameBudget`` (at most ~4 Hz, and slower when frames are costly, so
that watching a run takes little CPU from it).  The keys here change only what
is shown: the panel, the plots' axis and metric filter, the runs compared; the
``RunScreen`` adds the keys that steer the engine.
"""

from __future__ import annotations

import gc
import subprocess
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.constants import MAX_FPS
from textual.containers import Container, Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer

from spu_engine.core.writes import WriteError, atomic_write_text
from spu_tui.compare import ComparedRun
from spu_tui.frames import FrameBudget
from spu_tui.latency import RoundTrips
from spu_tui.run_model import Aspect, RunModel
from spu_tui.screens.runs import RunsChoice, RunsScreen
from spu_tui.session import EngineSession
from spu_tui.widgets.controls import ControlsPanel
from spu_tui.widgets.key_bar import KeyBar
from spu_tui.widgets.learning_view import LearningView
from spu_tui.widgets.log_panel import LogPanel
from spu_tui.widgets.panel_bar import PanelBar
from spu_tui.widgets.run_charts import LossChart, MetricFilter, SparsityChart
from spu_tui.widgets.run_header import RunHeader
from spu_tui.widgets.system_view import SystemView
from spu_tui.widgets.unit_tree import UnitTree


class Console(Protocol):
    """What the run screen uses of its App (``SpuApp``): the run, the session with its engine, the trackers."""

    run_dir: Path
    engine: subprocess.Popen | None
    history: list[dict[str, Any]]
    state: RunModel
    session: EngineSession
    frames: FrameBudget
    round_trips: RoundTrips
    compared: list[ComparedRun]

    def open_run(self, run_dir: Path, compare: list[Path]) -> None: ...


PANELS = [
    ("loss", "Loss"),
    ("sparsity", "Sparsity"),
    ("learning", "Learning"),
    ("controls", "Controls"),
    ("log", "Log"),
    ("system", "System"),
]
GRID_ORDER = ["loss", "controls", "sparsity", "learning", "log", "system"]  # placement in the wide grid (app.tcss)
WIDE_AT = (160, 45)  # columns, rows from which every panel is shown at once (below: one at a time, keys 1-6)
ROOMY_FROM = 120  # columns from which the tree, with one panel beside it, is wide enough for whole tensor names
VIEW_GAP = 1.5 / MAX_FPS  # seconds between the views of one frame of progress: each gets a screen refresh of its own
FOLLOW_EVERY = 2.0  # seconds between looks at the compared runs' events.jsonl (a stat each while none grows)

Panel = LossChart | SparsityChart | LearningView | ControlsPanel | LogPanel | SystemView


class RunView(Protocol):
    """A widget that draws part of the ``RunModel``: again whenever an aspect it watches is revised."""

    WATCHES: ClassVar[tuple[Aspect, ...]]

    def show(self, state: RunModel) -> None: ...


class CompareEvents(Message):
    """A worker read events appended to compared runs' events.jsonl: (run, events) pairs."""

    def __init__(self, grown: list[tuple[ComparedRun, list[dict[str, Any]]]]) -> None:
        super().__init__()
        self.grown = grown


class PanelsScreen(Screen[None]):
    """The run model drawn in panels, frame by frame; the ``RunScreen`` is this with the engine steered."""

    BINDINGS = [
        Binding("escape", "focus_tree", "tree", show=False),
        Binding("left_square_bracket", "imp_round(-1)", "IMP round before", show=False),
        Binding("right_square_bracket", "imp_round(1)", "IMP round after", show=False),
        Binding("slash", "filter_metrics", "filter metrics", show=False),
        Binding("w", "toggle_x", "steps / wall time", show=False),
        Binding("b", "browse_runs", "runs", show=False),
        Binding("c", "browse_runs", "compare", show=False),
        Binding("g", "save_plot", "save plot", show=False),
        *[Binding(str(i + 1), f"show_panel('{pid}')", title, show=False) for i, (pid, title) in enumerate(PANELS)],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.active_panel = "loss"
        self.header = RunHeader(id="header")
        self.unit_tree = UnitTree(id="tree")
        self.panel_bar = PanelBar(PANELS, id="panel-bar")
        self.controls = ControlsPanel(id="controls")
        self.log_view = LogPanel(id="log")
        self.panels: dict[str, Panel] = {
            "loss": LossChart(id="loss"),
            "sparsity": SparsityChart(id="sparsity"),
            "learning": LearningView(id="learning"),
            "controls": self.controls,
            "log": self.log_view,
            "system": SystemView(id="system"),
        }
        self._drawn: dict[RunView, tuple[int, ...]] = {}  # view -> the stamp of what it watches when it last drew
        self._frame_timer: Timer | None = None
        self._follow_timer: Timer | None = None

    @property
    def loss_chart(self) -> LossChart:
        return cast(LossChart, self.panels["loss"])

    @property
    def learning(self) -> LearningView:
        return cast(LearningView, self.panels["learning"])

    @property
    def console(self) -> Console:
        return cast(Console, self.app)

    @property
    def state(self) -> RunModel:
        return self.console.state

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield self.header
        with Horizontal(id="main"):
            with Vertical(id="tree-column"):
                yield self.unit_tree
                yield self.unit_tree.full_name
            with Vertical(id="right"):
                yield self.panel_bar
                with Container(id="panels"):
                    for pid in GRID_ORDER:
                        panel = self.panels[pid]
                        panel.border_title = dict(PANELS)[pid]
                        panel.add_class("panel")
                        yield panel
        yield KeyBar(id="keys")

    def on_mount(self) -> None:
        self._layout_for(self.app.size.width, self.app.size.height)
        self.unit_tree.focus()
        # what exists now (the imported engine modules: torch alone is ~200k objects) lives as long as the console:
        # a full cyclic-GC pass over it costs 0.1-0.3 s of CPU, over 10 s of the watching budget: leave it out of them
        gc.freeze()
        self._compare(self.console.compared)
        self._frame(measured=False)

    def on_resize(self, event) -> None:
        self._layout_for(event.size.width, event.size.height)

    def _layout_for(self, width: int, height: int) -> None:
        wide = width >= WIDE_AT[0] and height >= WIDE_AT[1]
        self.set_class(wide, "-wide")
        self.set_class(not wide, "-narrow")
        self.set_class(not wide and width >= ROOMY_FROM, "-roomy")
        self._show_active_panel()
        for pid in ("loss", "sparsity"):
            self._drawn.pop(self.panels[pid], None)  # plots are drawn for their size: redraw at the new one
        self.call_after_refresh(self._frame, measured=False)  # at the new sizes; panels hidden until now are stale

    def _show_active_panel(self) -> None:
        self.panel_bar.active = self.active_panel
        for pid, _ in PANELS:
            self.panels[pid].set_class(pid == self.active_panel, "-active")

    def action_show_panel(self, pid: str) -> None:
        self.active_panel = pid
        self._show_active_panel()
        self._frame(measured=False)
        if pid == "log":
            self.call_after_refresh(self.log_view.rewrap)

    def action_focus_tree(self) -> None:
        self.unit_tree.focus()

    def action_imp_round(self, delta: int) -> None:
        """The sparsity panel shows the round before or after (past the last round: now)."""
        chart = cast(SparsityChart, self.panels["sparsity"])
        chart.step_round(delta, self.state)
        self._drawn.pop(chart, None)
        self._frame(measured=False)

    # ------------------------------------------------------------------ other runs, metrics, plots

    def action_filter_metrics(self) -> None:
        """``/``: type a glob; the loss panel plots every metric whose name matches (enter keeps it, esc clears it)."""
        if not self.has_class("-wide"):
            self.action_show_panel("loss")
        self.loss_chart.add_class("-filtering")
        self.loss_chart.filter_input.focus()

    @on(MetricFilter.Changed, "#metric-filter")
    def _filter_changed(self, event: MetricFilter.Changed) -> None:
        self.loss_chart.pattern = event.value.strip()
        self._redraw(self.loss_chart)

    @on(MetricFilter.Submitted, "#metric-filter")
    def _filter_kept(self, _: MetricFilter.Submitted) -> None:
        self.loss_chart.remove_class("-filtering")
        self.unit_tree.focus()

    def on_metric_filter_cleared(self, _: MetricFilter.Cleared) -> None:
        self.loss_chart.pattern = ""
        self.loss_chart.remove_class("-filtering")
        self.unit_tree.focus()
        self._redraw(self.loss_chart)

    def action_toggle_x(self) -> None:
        chart = self.loss_chart
        chart.by_time = not chart.by_time
        self._say(f"loss plot x axis: {'minutes since each run started' if chart.by_time else 'steps'}")
        self._redraw(chart)

    def _redraw(self, view: RunView) -> None:
        self._drawn.pop(view, None)
        self._frame(measured=False)

    def action_browse_runs(self) -> None:
        """The runs beside this one: enter opens one, space marks runs to compare with this one."""
        here = self.console.run_dir

        def chosen(choice: RunsChoice | None) -> None:
            if choice is None:
                return
            if choice.open is not None and choice.open.resolve() != here.resolve():
                self.app.call_later(self.console.open_run, choice.open, choice.compare)  # once the browser is gone
                return
            self._compare([ComparedRun(p) for p in choice.compare if p.resolve() != here.resolve()])
            self._redraw(self.loss_chart)

        marked = [c.path for c in self.console.compared]
        self.app.push_screen(RunsScreen(here.parent, current=here, marked=marked), chosen)

    def pause_following(self) -> None:
        """This screen no longer shows the app's run (another run's screen took its place)."""
        if self._follow_timer is not None:
            self._follow_timer.stop()
            self._follow_timer = None

    def _compare(self, runs: list[ComparedRun]) -> None:
        """Overlay ``runs`` on the loss plot and follow them as they grow (each keeps what it already read)."""
        have = {c.path.resolve(): c for c in self.console.compared}
        self.console.compared[:] = [have.get(r.path.resolve(), r) for r in runs]
        self.loss_chart.compared = self.console.compared
        self.pause_following()
        if runs:
            self._follow()
            self._follow_timer = self.set_interval(FOLLOW_EVERY, self._follow)

    @work(thread=True, exclusive=True, group="compare")
    def _follow(self) -> None:
        grown = [(run, events) for run in list(self.console.compared) if (events := run.new_events())]
        if grown:
            self.post_message(CompareEvents(grown))

    def on_compare_events(self, message: CompareEvents) -> None:
        changed = False
        for run, events in message.grown:
            changed |= run.add(events)
        if changed:
            self._drawn.pop(self.loss_chart, None)
            self._frame_soon()

    def action_save_plot(self) -> None:
        """Save the plot on screen (the loss panel, or the sparsity panel when it is the one shown) as an SVG here."""
        pid = self.active_panel if not self.has_class("-wide") and self.active_panel in ("loss", "sparsity") else "loss"
        chart = cast(LossChart | SparsityChart, self.panels[pid])
        what = "metrics" if pid == "loss" and self.loss_chart.pattern else pid
        run = self.console.run_dir.name
        path = Path.cwd() / f"{run}-{what}-step{self.state.step}.svg"
        try:
            atomic_write_text(path, chart.export_svg(f"{run}: {what} at step {self.state.step}"))
        except WriteError as exc:
            self._say(f"save plot: {exc}", error=True)
            return
        self._say(f"saved the {what} plot to {path}")
        self.notify(f"saved {path.name}", timeout=4)

    # ------------------------------------------------------------------ frames

    def _visible_views(self) -> list[RunView]:
        wide = self.has_class("-wide")
        shown = [view for pid, view in self.panels.items() if wide or pid == self.active_panel]
        return [self.header, self.unit_tree, *shown]

    def stale_views(self) -> list[RunView]:
        """The views on screen whose part of the state has changed since they last drew."""
        return [view for view in self._visible_views() if self._drawn.get(view) != self.state.stamp(view.WATCHES)]

    def _frame_soon(self) -> None:
        """Training progress: the next frame when the budget allows."""
        if self._frame_timer is None and self.stale_views():
            self._frame_timer = self.set_timer(self.console.frames.wait(), self._frame)

    def key_first(self) -> None:
        """A key's change is on its way: a frame due now waits until its mark is drawn (``FrameBudget.key_pressed``)."""
        self.console.frames.key_pressed()
        self._reschedule()

    def marks_drawn(self) -> None:
        """Call after the refresh that drew the keys' marks: a frame held for them starts when its pace allows."""
        self.console.frames.marks_drawn()
        self._reschedule()

    def _reschedule(self) -> None:
        if self._frame_timer is not None:
            self._frame_timer.stop()
            self._frame_timer = None
            self._frame_soon()

    def _frame(self, measured: bool = True) -> None:
        """Draw every stale view; ``measured``: a frame of training progress, which spaces the next."""
        if self._frame_timer is not None:
            self._frame_timer.stop()
            self._frame_timer = None
        if not self.is_attached:
            return  # engine events may still arrive while the console shuts down, with no views to draw on
        stale = self.stale_views()
        if not measured:
            self.console.frames.frame_started(measured=False)
            for view in stale:
                self._draw(view)
        elif stale:
            self.console.frames.frame_started(measured=True)
            self._draw_in_turn(stale)

    def _draw_in_turn(self, views: list[RunView]) -> None:
        """Training progress, one view per screen refresh: Textual repaints the box around everything refreshed
        together, so the header and the log drawn at once would repaint every widget between them (the controls,
        ~100 of them, for nothing).  The next view waits past the screen's next refresh (``VIEW_GAP``): a refresh
        is due only once each widget has told the screen it changed, later than ``call_after_refresh`` runs."""
        while views and self.is_attached:
            view = views.pop(0)
            if view in self.stale_views():  # not drawn meanwhile (by a frame that answers the user)
                self._draw(view)
                if views:
                    self.set_timer(VIEW_GAP, partial(self._draw_in_turn, views))
                return

    def _draw(self, view: RunView) -> None:
        view.show(self.state)
        self._drawn[view] = self.state.stamp(view.WATCHES)

    def _say(self, text: str, error: bool = False, logged: bool = False) -> None:
        """Tell the user: a log line (unless the engine's event already ``logged`` it), and a notification for errors."""
        if not logged:
            self.state.say(self.state.step, "ui", text, error)
            self._frame(measured=False)
        if error:
            self.notify(text, severity="error", timeout=6)
