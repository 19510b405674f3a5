"""The console: one screen of views over a ``RunState``, steering an engine process.

Data flows one way: engine events -> ``RunState.apply`` -> dirty marks on the
views they touched -> one frame that draws them all, spaced by ``FrameBudget``
(at most ~4 Hz, and slower when frames are costly, so that watching a run takes
little CPU from it).  User actions flow the other way: widgets post messages
up, the app turns them into protocol commands, and the affected rows stay
*pending* until the engine's ack arrives at a step boundary; the engine's
answers are drawn at once, without waiting for the next frame.
"""

from __future__ import annotations

import gc
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Container, Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer

from .frames import DEFAULT_SHARE, FrameBudget
from .link import EngineLink, EventsArrived
from spu_engine.protocol import read_event

from .run_state import LogLine, RunState
from .screens.export import ExportScreen
from .screens.help import HelpScreen
from .screens.quit import QuitScreen
from .widgets.chart import BarSpec, Chart, LineSpec, Series
from .widgets.controls import TITLES, ControlsPanel
from .widgets.event_log import EventLog
from .widgets.key_bar import KeyBar
from .widgets.learning_view import LearningView
from .widgets.panel_bar import PanelBar
from .widgets.run_header import RunHeader
from .widgets.unit_tree import Row, UnitTree

PANELS = [("loss", "Loss"), ("sparsity", "Sparsity"), ("learning", "Learning"), ("controls", "Controls"), ("log", "Log")]
GRID_ORDER = ["loss", "controls", "sparsity", "learning", "log"]  # placement in the large-terminal grid (see app.tcss)
WIDE_AT = (120, 36)  # columns, rows from which every panel is shown at once
LOSS_LEGEND = "[gray]loss[/] [cyan]smoothed[/] [yellow]eval loss[/] [green]{metric} (right axis)[/] [magenta]│ policy change[/]"
LOSS_LEGEND_SHORT = "[gray]loss[/] [cyan]smooth[/] [yellow]eval[/] [green]{metric:.3}→[/] [magenta]│chg[/]"
COALESCE = 0.01  # seconds a due frame still waits, so that a burst of events is drawn once
STOP_TIMEOUT = 30.0  # seconds to wait for the engine's ack of a stop before leaving anyway


@dataclass
class Pending:
    """A command on its way: what it will change, and when it was sent."""

    cmd: str
    sent: float
    rows: list[Row] = field(default_factory=list)
    section: str | None = None
    received: bool = False  # the engine has it and applies it at its next step boundary


class ConnectFailed(Message):
    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class SpuApp(App):
    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute, so subclasses elsewhere find it
    TITLE = "SPU"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("p", "pause_resume", "pause/resume"),
        Binding("e", "export", "export"),
        Binding("s", "checkpoint", "checkpoint"),
        Binding("r", "evaluate", "evaluate"),
        Binding("z", "undo", "undo"),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit_dialog", "quit"),
        Binding("escape", "focus_tree", "tree", show=False),
        *[Binding(str(i + 1), f"show_panel('{pid}')", title, show=False) for i, (pid, title) in enumerate(PANELS)],
    ]

    def __init__(
        self,
        run_dir: Path,
        *,
        history: list[dict[str, Any]] | None = None,
        engine: subprocess.Popen | None = None,
        connect: bool = True,
        cpu_share: float = DEFAULT_SHARE,
    ) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.engine = engine  # the process we started, if any (attach leaves it None)
        self.state = RunState(run=self.run_dir.name, run_dir=str(self.run_dir))
        self.history = [ev for ev in history or [] if isinstance(ev, dict)]
        self.history_t = max((t for ev in self.history if isinstance(t := ev.get("t"), (int, float))), default=0.0)
        self.link = EngineLink(self, self.run_dir) if connect else None
        self.pending: dict[str, Pending] = {}
        self.previews: dict[str, str] = {}  # preview command id -> the controls section that asked
        self.roundtrips: list[tuple[float, float]] = []  # (key -> redraw, engine ack -> redraw) seconds
        self.received_roundtrips: list[float] = []  # key -> engine received -> redraw, seconds
        self.active_panel = "loss"
        self.frames = FrameBudget(cpu_share)
        self._dirty: set[str] = set()  # views to draw at the next frame: header tree log controls loss bars
        self._next_frame = 0.0  # monotonic time before which no frame of training progress starts
        self._frame_cpu: float | None = None  # process CPU when the last such frame began (None: start a new count)
        self._frame_timer: Timer | None = None
        self._loss_legend: str | None = None
        self._exit_on: str | None = None  # id of the stop command whose ack ends the app
        self.stopped_engine = False  # the engine acknowledged a stop from this console
        self._exit_timer: Timer | None = None
        self.header = RunHeader(id="header")
        self.unit_tree = UnitTree(id="tree")
        self.panel_bar = PanelBar(PANELS, id="panel-bar")
        self.loss_chart = Chart(id="loss")
        self.sparsity_chart = Chart(id="sparsity")
        self.learning = LearningView(id="learning")
        self.controls = ControlsPanel(id="controls")
        self.log_view = EventLog(id="log")
        self.panels = {
            "loss": self.loss_chart,
            "sparsity": self.sparsity_chart,
            "learning": self.learning,
            "controls": self.controls,
            "log": self.log_view,
        }

    # ------------------------------------------------------------------ layout

    @property
    def main(self) -> Screen:
        """The run screen, also while a dialog is on top of it."""
        return self.screen_stack[0]

    @property
    def views_alive(self) -> bool:
        """False once the app shuts down: engine events may still arrive, with no views to draw on."""
        return bool(self.screen_stack) and self.header.is_attached

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
        self._layout_for(self.size.width, self.size.height)
        for ev in self.history:
            self.state.apply(ev)
        self._draw({"header", "tree", "log", "controls", "plots"}, now=True)
        self.unit_tree.focus()
        # what exists now (the imported engine modules: torch alone is ~200k objects) lives as long as the console:
        # a full cyclic-GC pass over it costs 0.1-0.3 s of CPU, over 10 s of the watching budget, so leave it out of them
        gc.freeze()
        if self.link is not None:
            self._connect()
        elif self.history:
            self.state.log.append(LogLine(self.state.step, "ui", "engine not running: showing the run's history"))
            self._draw({"log"}, now=True)

    def on_resize(self, event) -> None:
        self._layout_for(event.size.width, event.size.height)

    def _layout_for(self, width: int, height: int) -> None:
        wide = width >= WIDE_AT[0] and height >= WIDE_AT[1]
        self.main.set_class(wide, "-wide")
        self.main.set_class(not wide, "-narrow")
        self._show_panel_bar()
        self.call_after_refresh(self._draw, {"loss", "bars"}, now=True)  # at the new sizes; panels hidden until now are stale

    def _show_panel_bar(self) -> None:
        self.panel_bar.active = self.active_panel
        for pid, _ in PANELS:
            self.panels[pid].set_class(pid == self.active_panel, "-active")

    def action_show_panel(self, pid: str) -> None:
        self.active_panel = pid
        self._show_panel_bar()
        self._draw({"loss", "bars"}, now=True)
        if pid == "log":
            self.call_after_refresh(self.log_view.rewrap)

    def action_focus_tree(self) -> None:
        self.unit_tree.focus()

    # ------------------------------------------------------------------ engine events

    @work(thread=True, exclusive=True, group="connect")
    def _connect(self) -> None:
        assert self.link is not None
        try:
            self.link.connect()
        except ConnectionError as exc:
            self.post_message(ConnectFailed(str(exc)))

    def on_connect_failed(self, message: ConnectFailed) -> None:
        if not self.views_alive:
            return
        self.state.state = "detached"
        hint = ""
        if self.engine is not None and self.engine.poll() is not None:
            hint += f" | the engine exited with code {self.engine.returncode}"
        log = self.run_dir / "engine.log"
        if log.exists():
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            hint = " | engine.log: " + " / ".join(tail)
        self.state.log.append(LogLine(self.state.step, "error", f"cannot reach the engine: {message.reason}{hint}", True))
        self._draw({"header", "log"}, now=True)

    def on_events_arrived(self, _: EventsArrived) -> None:
        assert self.link is not None
        changed: set[str] = set()
        acks, received, previews = [], [], []
        failed = None
        hello = False
        for ev in self.link.drain():
            if not isinstance(ev, dict):
                continue
            if ev.get("type") != "hello" and isinstance(ev.get("t"), (int, float)) and ev["t"] <= self.history_t:
                continue  # already drawn from events.jsonl
            changed |= self.state.apply(ev)
            if ev.get("type") == "ack":
                acks.append(ev)
            elif ev.get("type") == "received":
                received.append(ev)
            elif ev.get("type") == "hello":
                hello = True
            elif ev.get("type") == "preview":
                previews.append(ev)
            elif ev.get("type") == "state" and ev.get("state") == "error":
                failed = ev.get("message") or "the engine failed"
        if self.views_alive:
            # answers to the user (and the first snapshot) are drawn now; training progress waits for the next frame
            self._draw(changed, now=bool(acks or received or hello or failed))
            for ev in received:
                self._received(ev)
            for ack in acks:
                self._acknowledged(ack)
            for ev in previews:
                section = self.previews.pop(str(ev.get("id")), None)
                answer = read_event(ev)
                if section is not None and answer is not None:
                    self.controls.show_preview(section, answer)
            if failed:  # the run cannot go on: show why, whichever panel was up
                self.action_show_panel("log")
                self.notify(failed, title="engine error", severity="error", timeout=10)

    def _acknowledged(self, ack: dict[str, Any]) -> None:
        if self._exit_on is not None and self._exit_on == str(ack.get("id")):
            if ack.get("ok"):
                self.stopped_engine = True
                self.exit()  # the engine took the stop (after its checkpoint, if asked for)
                return
            self._exit_on = None  # e.g. the checkpoint could not be written: the run goes on, and so do we
            if self._exit_timer is not None:
                self._exit_timer.stop()
            self._notify_log(f"stop refused: {ack.get('message', '')}", error=True)
            return
        pending = self.pending.pop(str(ack.get("id")), None)
        if pending is None:
            return
        ok = bool(ack.get("ok"))
        if pending.rows:
            self.unit_tree.set_pending(pending.rows, False)
            if ok:
                self.call_after_refresh(self._record_roundtrip, pending.sent, ack.get("t", time.time()))
        if pending.section:
            self.controls.acknowledged(pending.section, ok, ack.get("step", self.state.step), ack.get("message", ""), self.state.policy)
        if pending.cmd == "undo":
            self._notify_log(f"undo: {ack.get('message', '')}" if ok else f"undo refused: {ack.get('message', '')}", error=not ok)
        if not ok and pending.rows:
            self._notify_log(f"{pending.cmd} refused: {ack.get('message', '')}", error=True, logged=True)

    def _received(self, ev: dict[str, Any]) -> None:
        """The engine has the command: rows and sections show it is queued for the next boundary."""
        pending = self.pending.get(str(ev.get("id")))
        if pending is None or pending.received:
            return
        pending.received = True
        if pending.rows:
            self.unit_tree.set_queued(pending.rows)
            self.call_after_refresh(self._record_received, pending.sent)
        if pending.section:
            self.controls.set_status(pending.section, f"queued: {TITLES.get(pending.section, 'freeze rules')} applies at the next step boundary", "pending")

    def _record_received(self, sent: float) -> None:
        self.received_roundtrips.append(time.perf_counter() - sent)

    def _record_roundtrip(self, sent: float, ack_t: float) -> None:
        self.roundtrips.append((time.perf_counter() - sent, time.time() - ack_t))

    def _draw(self, changed: set[str], now: bool = False) -> None:
        """Mark the views an event touched; draw them now, or at the next frame the budget allows."""
        if "tree" in changed:
            changed = changed | {"loss", "bars"}  # units, policy: every plot (bars, learning view, change marks)
        if "plots" in changed:
            changed = (changed - {"plots"}) | {"loss"}  # a step or an eval moves the loss plot only
        self._dirty |= changed
        if now:
            self._frame(measured=False)
        elif self._dirty and self._frame_timer is None and self.views_alive:
            self._frame_timer = self.set_timer(max(COALESCE, self._next_frame - time.monotonic()), self._frame)

    def _frame(self, measured: bool = True) -> None:
        """Draw every dirty view; a frame of training progress (``measured``) spaces the next by the CPU used since the last."""
        if self._frame_timer is not None:
            self._frame_timer.stop()
            self._frame_timer = None
        if not measured:
            self._frame_cpu = None  # the user's own actions are not budgeted: this cycle does not count
        if not self._dirty or not self.views_alive:
            return
        dirty, self._dirty = self._dirty, set()
        if measured:
            cpu = time.process_time()
            if self._frame_cpu is not None:  # since the last frame began: its drawing, Textual's compositing, events
                self.frames.spent(cpu - self._frame_cpu)
            self._frame_cpu = cpu
            self._next_frame = time.monotonic() + self.frames.interval
        s = self.state
        if "header" in dirty:
            header = self.header
            header.run_name, header.model, header.state = s.run, s.model, s.state
            header.step, header.total, header.samples_per_s, header.eta_s = s.step, s.total_steps, s.samples_per_s, s.eta_s
            header.waiting = s.waiting
        if "tree" in dirty:
            self.unit_tree.show(s)
        if "log" in dirty:
            self.log_view.show_new(s.log)
        if "controls" in dirty and s.policy:
            self.controls.load(s.policy)
        wide = self.main.has_class("-wide")
        if "loss" in dirty and (wide or self.active_panel == "loss"):
            self._draw_loss()
        if "bars" in dirty and (wide or self.active_panel == "sparsity"):
            names = [u.name for u in s.units] if s.unit_stats else []
            self.sparsity_chart.redraw(
                BarSpec(
                    labels=[_short_unit(n) for n in names],
                    values=[stats.sparsity if (stats := s.unit_stats.get(n)) else 0.0 for n in names],
                    ylim=(0.0, 1.0),
                )
            )
        if "bars" in dirty and (wide or self.active_panel == "learning"):
            self.learning.show(s)

    def _draw_loss(self) -> None:
        s = self.state
        loss = self.loss_chart
        legend = LOSS_LEGEND if loss.size.width >= 80 else LOSS_LEGEND_SHORT
        subtitle = legend.format(metric=s.metric)
        if subtitle != self._loss_legend:
            self._loss_legend = loss.border_subtitle = subtitle
        loss.redraw(
            LineSpec(
                series=[
                    Series(s.loss_steps, s.loss, color="gray"),
                    Series(s.loss_steps, s.loss_smooth, color="cyan"),
                    Series(s.eval_steps, s.eval_loss, color="yellow", marker="hd"),
                    Series(s.eval_steps, s.eval_metric, color="green", right_axis=True, marker="hd"),
                ],
                marks=s.change_steps,
            )
        )

    # ------------------------------------------------------------------ user actions

    def _send(self, cmd: str, **fields: Any) -> str | None:
        if self.link is None or not self.link.connected:
            self._notify_log(f"{cmd}: no engine connected", error=True)
            return None
        cid = self.link.send(cmd, **fields)
        if cid is None:
            self._notify_log(f"{cmd}: the engine socket is closed", error=True)
        return cid

    def _notify_log(self, text: str, error: bool = False, logged: bool = False) -> None:
        if not logged:
            self.state.log.append(LogLine(self.state.step, "ui", text, error))
            self._draw({"log"}, now=True)
        if error:
            self.notify(text, severity="error", timeout=6)

    def on_unit_tree_change_requested(self, message: UnitTree.ChangeRequested) -> None:
        sent = time.perf_counter()
        cid = self._send("change", change={"freeze": message.rules})
        if cid is not None:
            self.pending[cid] = Pending("change", sent, rows=message.rows)
            self.unit_tree.set_pending(message.rows, True)

    def on_controls_panel_apply_requested(self, message: ControlsPanel.ApplyRequested) -> None:
        cid = self._send("change", change={"set": {message.section: message.values}})
        if cid is not None:
            self.pending[cid] = Pending("change", time.perf_counter(), section=message.section)
            self.controls.set_status(message.section, f"sent: {TITLES.get(message.section, 'freeze rules')}", "pending")

    def on_controls_panel_preview_requested(self, message: ControlsPanel.PreviewRequested) -> None:
        if self.link is None or not self.link.connected:
            return
        cid = self.link.send("preview", change={"set": {message.section: message.values}})
        if cid is not None:
            self.previews[cid] = message.section

    def action_undo(self) -> None:
        """Undo the last change made from a console (the engine records it as a new change, so replay stays exact)."""
        cid = self._send("undo")
        if cid is not None:
            self.pending[cid] = Pending("undo", time.perf_counter())
            self._notify_log("undo requested (applies at the next step boundary)")

    def action_pause_resume(self) -> None:
        self._send("resume" if self.state.state == "paused" else "pause")

    def action_checkpoint(self) -> None:
        if self._send("checkpoint"):
            self._notify_log("checkpoint requested (written at the next step boundary)")

    def action_evaluate(self) -> None:
        if self._send("evaluate"):
            self._notify_log("evaluation requested (runs at the next step boundary)")

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_export(self) -> None:
        default = Path(self.state.run_dir or self.run_dir) / "policy-export.yaml"

        def chosen(choice: tuple[Path, bool] | None) -> None:
            if choice is None:
                return
            path, overwrite = choice
            if self._send("export", path=str(path.resolve()), overwrite=overwrite):
                self.notify(f"exporting to {path} at the next step boundary", timeout=4)

        self.push_screen(ExportScreen(default), chosen)

    def action_quit_dialog(self) -> None:
        alive = self.link is not None and self.link.connected and self.state.state not in ("finished", "stopped", "error")
        self.push_screen(QuitScreen(engine_alive=alive), self._quit_chosen)

    def _quit_chosen(self, choice: str | None) -> None:
        if choice == "detach":
            self.exit()
        elif choice in ("stop_checkpoint", "stop_now"):
            cid = self._send("stop", checkpoint=choice == "stop_checkpoint")
            if cid is None:
                self.exit()
                return
            self._exit_on = cid
            self._notify_log("stopping: waiting for the engine to finish the current step" + (" and write a checkpoint" if choice == "stop_checkpoint" else ""))
            self._exit_timer = self.set_timer(STOP_TIMEOUT, self.exit)

    def on_unmount(self) -> None:
        if self.link is not None:
            self.link.close()


def _short_unit(name: str) -> str:
    if name.startswith("block"):
        return "b" + name[5:]
    return {"embeddings": "emb"}.get(name, name)
