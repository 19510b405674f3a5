"""The run screen: the unit tree beside the panels, steering an engine process.

Data flows one way: engine events -> ``RunModel.apply`` -> revised aspects of
the run -> one frame that draws every visible view watching one of them,
spaced by ``FrameBudget`` (at most ~4 Hz, and slower when frames are costly, so
that watching a run takes little CPU from it).  User actions flow the other
way: widgets post messages up, the screen turns them into protocol commands,
and the ``CommandTracker`` follows each until the engine's answer arrives at a
step boundary; the engine's answers are drawn at once, without waiting for the
next frame.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer

from spu_engine.policy import Change
from spu_engine.protocol import PreviewEvent, read_event
from spu_engine.runs import ENGINE_LOG
from spu_engine.writes import WriteError, atomic_write_text

from ..commands import Command, CommandTracker
from ..compare import ComparedRun
from ..frames import FrameBudget
from ..latency import RoundTrips
from ..link import EventsArrived, Link
from ..run_model import Aspect, RunModel
from ..widgets.controls import ControlsPanel
from ..widgets.log_panel import LogPanel
from ..widgets.key_bar import KeyBar
from ..widgets.learning_view import LearningView
from ..widgets.panel_bar import PanelBar
from ..widgets.run_charts import LossChart, MetricFilter, SparsityChart
from ..widgets.run_header import RunHeader
from ..widgets.system_view import SystemView
from ..widgets.unit_tree import Row, UnitTree
from .ablation import AblationScreen
from .export import ExportScreen
from .help import HelpScreen
from .quit import QuitScreen
from .runs import RunsChoice, RunsScreen


class Console(Protocol):
    """What the run screen uses of its App (``SpuApp``): the run, the link, the trackers."""

    run_dir: Path
    engine: subprocess.Popen | None
    history: list[dict[str, Any]]
    state: RunModel
    link: Link | None
    commands: CommandTracker
    frames: FrameBudget
    round_trips: RoundTrips
    compared: list[ComparedRun]

    def seen_in_history(self, ev: dict[str, Any]) -> bool: ...

    def open_run(self, run_dir: Path, compare: list[Path]) -> None: ...

PANELS = [("loss", "Loss"), ("sparsity", "Sparsity"), ("learning", "Learning"), ("controls", "Controls"), ("log", "Log"), ("system", "System")]
GRID_ORDER = ["loss", "controls", "sparsity", "learning", "log", "system"]  # placement in the large-terminal grid (see app.tcss)
WIDE_AT = (120, 36)  # columns, rows from which every panel is shown at once
ROOMY_FROM = 160  # columns from which the grid puts controls beside the plots (below: the loss plot takes the full width)
FOLLOW_EVERY = 2.0  # seconds between looks at the compared runs' events.jsonl (a stat each while they do not grow)
ABLATE_CHECKPOINT_WAIT = 120.0  # seconds for a paused run's checkpoint before the ablation gives up
STOP_TIMEOUT = 30.0  # seconds to wait for the engine's ack of a stop before leaving anyway
ANSWERS = ("ack", "received", "hello", "preview")  # events that answer the user: drawn at once
ADVICE = "advice"  # the commands of the learning view's freeze advice (its previews are drawn there)
STOPPED = "stopped"  # the app's result when the engine acknowledged a stop from this console

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


class ConnectFailed(Message):
    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class RunScreen(Screen[None]):
    BINDINGS = [
        Binding("p", "pause_resume", "pause/resume"),
        Binding("e", "export", "export"),
        Binding("s", "checkpoint", "checkpoint"),
        Binding("r", "evaluate", "evaluate"),
        Binding("z", "undo", "undo"),
        Binding("a", "ablate", "ablate", show=False),
        Binding("v", "freeze_advice", "freeze advice", show=False),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit_dialog", "quit"),
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
        self._drawn: dict[RunView, tuple[int, ...]] = {}  # view -> the state's stamp of what it watches when it last drew
        self._frame_timer: Timer | None = None
        self._stop_timer: Timer | None = None
        self._follow_timer: Timer | None = None

    @property
    def loss_chart(self) -> LossChart:
        return cast(LossChart, self.panels["loss"])

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
            self.unit_tree.border_title = "units"
            yield self.unit_tree
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
        # a full cyclic-GC pass over it costs 0.1-0.3 s of CPU, over 10 s of the watching budget, so leave it out of them
        gc.freeze()
        if self.console.link is not None:
            self._connect()
        elif self.console.history:
            self.state.say(self.state.step, "ui", "engine not running: showing the run's history")
        self._compare(self.console.compared)
        self._frame(measured=False)

    def on_resize(self, event) -> None:
        self._layout_for(event.size.width, event.size.height)

    def _layout_for(self, width: int, height: int) -> None:
        wide = width >= WIDE_AT[0] and height >= WIDE_AT[1]
        self.set_class(wide, "-wide")
        self.set_class(wide and width < ROOMY_FROM, "-medium")
        self.set_class(not wide, "-narrow")
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

        self.app.push_screen(RunsScreen(here.parent, current=here, marked=[c.path for c in self.console.compared]), chosen)

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
            atomic_write_text(path, chart.plot.export_svg(f"{run}: {what} at step {self.state.step}"))
        except WriteError as exc:
            self._say(f"save plot: {exc}", error=True)
            return
        self._say(f"saved the {what} plot to {path}")
        self.notify(f"saved {path.name}", timeout=4)

    # ------------------------------------------------------------------ frames

    def _visible_views(self) -> list[RunView]:
        wide = self.has_class("-wide")
        return [self.header, self.unit_tree, *(view for pid, view in self.panels.items() if wide or pid == self.active_panel)]

    def stale_views(self) -> list[RunView]:
        """The views on screen whose part of the state has changed since they last drew."""
        return [view for view in self._visible_views() if self._drawn.get(view) != self.state.stamp(view.WATCHES)]

    def _frame_soon(self) -> None:
        """Training progress: the next frame when the budget allows."""
        if self._frame_timer is None and self.stale_views():
            self._frame_timer = self.set_timer(self.console.frames.wait(), self._frame)

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
        elif stale:
            self.console.frames.frame_started(measured=True)
        for view in stale:
            view.show(self.state)
            self._drawn[view] = self.state.stamp(view.WATCHES)

    # ------------------------------------------------------------------ engine events

    @work(thread=True, exclusive=True, group="connect")
    def _connect(self) -> None:
        assert self.console.link is not None
        try:
            self.console.link.connect(self)
        except ConnectionError as exc:
            self.post_message(ConnectFailed(str(exc)))

    def on_connect_failed(self, message: ConnectFailed) -> None:
        hint = ""
        engine = self.console.engine
        if engine is not None and engine.poll() is not None:
            hint += f" | the engine exited with code {engine.returncode}"
        log = self.console.run_dir / ENGINE_LOG
        if log.exists():
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            hint += " | engine.log: " + " / ".join(tail)
        self.state.detach(f"cannot reach the engine: {message.reason}{hint}")
        self._frame(measured=False)

    def on_events_arrived(self, _: EventsArrived) -> None:
        assert self.console.link is not None
        answers: list[dict[str, Any]] = []
        failed = None
        for ev in self.console.link.drain():
            if not isinstance(ev, dict) or self.console.seen_in_history(ev):
                continue
            self.state.apply(ev)
            if ev.get("type") in ANSWERS:
                answers.append(ev)
            elif ev.get("type") == "state" and ev.get("state") == "error":
                failed = ev.get("message") or "the engine failed"
        if not self.is_attached:
            return
        # answers to the user (and the first snapshot) are drawn now; training progress waits for the next frame
        if answers or failed:
            self._frame(measured=False)
        else:
            self._frame_soon()
        for ev in answers:
            self._answered(ev)
        if failed:  # the run cannot go on: show why, whichever panel was up
            self.action_show_panel("log")
            self.notify(failed, title="engine error", severity="error", timeout=10)

    def _answered(self, ev: dict[str, Any]) -> None:
        commands = self.console.commands
        kind = ev.get("type")
        if kind == "received":
            command = commands.received(ev.get("id"))
            if command is not None:
                self._show_received(command)
        elif kind == "ack":
            command = commands.answered(ev.get("id"))
            if command is not None:
                self._show_ack(command, ev)
        elif kind == "preview":
            command = commands.answered(ev.get("id"))
            preview = read_event(ev)
            if command is not None and isinstance(preview, PreviewEvent):
                if command.section == ADVICE:
                    self.learning.show_preview(preview)
                elif command.section is not None:
                    self.controls.show_preview(command.section, preview)

    def _show_received(self, command: Command) -> None:
        """The engine has the change: rows and sections show it is queued for the next boundary."""
        if command.name not in ("change", "schedule", "unschedule"):
            return
        if command.rows:
            self.unit_tree.change_received(command.rows)
            self.call_after_refresh(self.console.round_trips.received_drawn, command.sent)
        if command.section:
            self.controls.change_received(command.section)

    def _show_ack(self, command: Command, ack: dict[str, Any]) -> None:
        ok, message = bool(ack.get("ok")), ack.get("message", "")
        if command.name == "stop":
            if ok:
                self.app.exit(result=STOPPED)  # the engine took the stop (after its checkpoint, if asked for)
                return
            if self._stop_timer is not None:  # e.g. the checkpoint could not be written: the run goes on, and so do we
                self._stop_timer.stop()
            self._say(f"stop refused: {message}", error=True)
        if command.rows:
            self.unit_tree.change_answered(command.rows)
            if ok:
                self.call_after_refresh(self.console.round_trips.applied_drawn, command.sent, ack.get("t", time.time()))
            else:
                self._say(f"{command.name} refused: {message}", error=True, logged=True)
        if command.name in ("schedule", "unschedule"):
            self.controls.schedule_answered(command.name == "schedule", ok, message)
        elif command.section:
            self.controls.acknowledged(command.section, ok, ack.get("step", self.state.step), message, self.state.policy)
        if command.name == "undo":
            self._say(f"undo: {message}" if ok else f"undo refused: {message}", error=not ok)

    # ------------------------------------------------------------------ user actions

    def _send(self, cmd: str, rows: list[Row] | None = None, section: str | None = None, **fields: Any) -> Command | None:
        """Send ``cmd`` and follow it until the engine answers; None (said to the user) when no engine takes it."""
        link = self.console.link
        if link is None or not link.connected:
            self._say(f"{cmd}: no engine connected", error=True)
            return None
        cid = link.send(cmd, **fields)
        if cid is None:
            self._say(f"{cmd}: the engine socket is closed", error=True)
            return None
        return self.console.commands.sent(cid, cmd, rows=rows, section=section)

    def _say(self, text: str, error: bool = False, logged: bool = False) -> None:
        """Tell the user: a log line (unless the engine's event already ``logged`` it), and a notification for errors."""
        if not logged:
            self.state.say(self.state.step, "ui", text, error)
            self._frame(measured=False)
        if error:
            self.notify(text, severity="error", timeout=6)

    def on_unit_tree_change_requested(self, message: UnitTree.ChangeRequested) -> None:
        self._send_freeze(message.change, message.rows)

    def _send_freeze(self, change: Change, rows: list[Row]) -> None:
        """A freeze change whose rows in the unit tree show it on its way until the engine answers."""
        if self._send("change", rows=rows, change=_wire(change)):
            self.unit_tree.change_sent(rows)

    def on_controls_panel_apply_requested(self, message: ControlsPanel.ApplyRequested) -> None:
        if self._send("change", section=message.section, change=_wire(message.change)):
            self.controls.change_sent(message.section)

    def on_controls_panel_schedule_requested(self, message: ControlsPanel.ScheduleRequested) -> None:
        if self._send("schedule", section="triggers", entry=message.entry):
            self.controls.change_sent("triggers")

    def on_controls_panel_unschedule_requested(self, message: ControlsPanel.UnscheduleRequested) -> None:
        if self._send("unschedule", section="triggers", entry=message.entry):
            self.controls.change_sent("triggers")

    def on_controls_panel_preview_requested(self, message: ControlsPanel.PreviewRequested) -> None:
        link = self.console.link
        if link is None or not link.connected:
            return  # a what-if is only a hint: no engine, no hint
        cid = link.send("preview", change=_wire(message.change))
        if cid is not None:
            self.console.commands.sent(cid, "preview", section=message.section)

    @property
    def learning(self) -> LearningView:
        return cast(LearningView, self.panels["learning"])

    def action_freeze_advice(self) -> None:
        """The learning view's advice: the first `v` previews freezing the settled front blocks, the next applies it (a
        console change like `f`, so `z` undoes it)."""
        view = self.learning
        change = view.advice_change()
        if change is None:
            self._say("freeze advice: no front block has settled yet (the advisor reads the learning panel's statistics)")
            return
        if view.proposed != change:
            link = self.console.link
            if link is None or not link.connected:
                self._say("freeze advice: no engine connected", error=True)
                return
            cid = link.send("preview", change=_wire(change))
            if cid is not None:
                self.console.commands.sent(cid, "preview", section=ADVICE)
            view.proposed, view.whatif = change, "what if: asking the engine …"
            return
        blocks = [f"block{i}" for r in change.freeze for i in (r.layers or [])]
        units = [u for r in change.freeze for u in (r.units or [])]
        rows = [Row("unit", u) for u in [*units, *blocks]]
        view.proposed, view.whatif = None, ""
        self._send_freeze(change, rows)

    def action_undo(self) -> None:
        """Undo the last change made from a console (the engine records it as a new change, so replay stays exact)."""
        if self._send("undo"):
            self._say("undo requested (applies at the next step boundary)")

    def action_pause_resume(self) -> None:
        self._send("resume" if self.state.state == "paused" else "pause")

    def action_checkpoint(self) -> None:
        if self._send("checkpoint"):
            self._say("checkpoint requested (written at the next step boundary)")

    def action_evaluate(self) -> None:
        if self._send("evaluate"):
            self._say("evaluation requested (runs at the next step boundary)")

    def action_ablate(self) -> None:
        """Houlsby et al.'s Fig. 6 on this run: its checkpoint evaluated without each block's adapters, in a process of
        its own (`spu ablate`), so neither the console nor the run waits; a paused run is checkpointed first."""
        method = self.state.policy.get("peft", {}).get("method", "none")
        if method != "adapter":
            self._say(f"ablate: removes Houlsby adapters, and this run has none (peft.method: {method})", error=True)
            return
        link = self.console.link
        live = link is not None and link.connected and self.state.state not in ("finished", "stopped", "error")
        if live and self.state.state != "paused":
            self._say("ablate: pause the run first (p): the ablation evaluates the model as it stands, from a checkpoint", error=True)
            return
        if live and self.state.checkpoint_step != self.state.step and self._send("checkpoint") is None:
            return
        self._say("ablate: evaluating without each block's adapters, then each span of blocks (the run is unchanged)")
        self._ablate(Path(self.state.run_dir or self.console.run_dir), self.state.step if live else None)

    @work(thread=True, exclusive=True, group="ablate")
    def _ablate(self, run_dir: Path, step: int | None) -> None:
        deadline = time.monotonic() + ABLATE_CHECKPOINT_WAIT
        while step is not None and self.state.checkpoint_step != step:  # the paused run's checkpoint, written at its boundary
            if time.monotonic() > deadline:
                self.app.call_from_thread(self._say, f"ablate: no checkpoint of step {step} after {ABLATE_CHECKPOINT_WAIT:.0f} s", True)
                return
            time.sleep(0.2)
        proc = subprocess.run([sys.executable, "-m", "spu_engine.cli", "ablate", "--run", str(run_dir), "--json"], capture_output=True, text=True)
        if proc.returncode != 0:
            reason = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[-1]
            self.app.call_from_thread(self._say, f"ablate: {reason}", True)
            return
        self.app.call_from_thread(self.app.push_screen, AblationScreen(json.loads(proc.stdout), step))

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen())

    def action_export(self) -> None:
        default = Path(self.state.run_dir or self.console.run_dir) / "policy-export.yaml"

        def chosen(choice: tuple[Path, bool] | None) -> None:
            if choice is None:
                return
            path, overwrite = choice
            if self._send("export", path=str(path.resolve()), overwrite=overwrite):
                self.notify(f"exporting to {path} at the next step boundary", timeout=4)

        self.app.push_screen(ExportScreen(default), chosen)

    def action_quit_dialog(self) -> None:
        link = self.console.link
        alive = link is not None and link.connected and self.state.state not in ("finished", "stopped", "error")
        self.app.push_screen(QuitScreen(engine_alive=alive), self._quit_chosen)

    def _quit_chosen(self, choice: str | None) -> None:
        if choice == "detach":
            self.app.exit()
        elif choice in ("stop_checkpoint", "stop_now"):
            if self._send("stop", checkpoint=choice == "stop_checkpoint") is None:
                self.app.exit()
                return
            self._say("stopping: waiting for the engine to finish the current step" + (" and write a checkpoint" if choice == "stop_checkpoint" else ""))
            self._stop_timer = self.set_timer(STOP_TIMEOUT, self.app.exit)


def _wire(change: Change) -> dict[str, Any]:
    """A change as the protocol carries it: only what it sets."""
    return change.model_dump(mode="json", exclude_defaults=True)
