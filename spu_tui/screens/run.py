"""The run screen: the panels, steering an engine process.

User actions flow against the data: widgets post messages up, and the screen
hands them to the ``EngineSession``, which sends them and follows each until
the engine's answer arrives at a step boundary; the session routes each answer
back here, where what it changed (a row's mark, a section's status) is drawn at
once, in the next refresh; the rest the events revised (the whole tree, plots,
the log) follows at the frame pace, so a key is never answered after a layout.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from textual import work
from textual.binding import Binding
from textual.message import Message
from textual.timer import Timer

from spu_engine.core.policy import Change
from spu_engine.core.protocol import PreviewEvent
from spu_engine.core.run_states import RunState
from spu_engine.methods import ablated_method
from spu_tui.link import EventsArrived
from spu_tui.screens.ablation import AblationFailed, AblationScreen, ablate
from spu_tui.screens.export import ExportScreen
from spu_tui.screens.help import HelpScreen
from spu_tui.screens.panels import PanelsScreen
from spu_tui.screens.quit import QuitScreen
from spu_tui.session import EngineSession, NotSent, PendingCommand, unreachable, wire
from spu_tui.widgets.controls import ControlsPanel
from spu_tui.widgets.method_section import ApplyRequested, PreviewRequested
from spu_tui.widgets.unit_tree import Row, UnitTree

ABLATE_CHECKPOINT_WAIT = 120.0  # seconds for a paused run's checkpoint before the ablation gives up
STOP_TIMEOUT = 30.0  # seconds to wait for the engine's ack of a stop before leaving anyway
ADVICE = "advice"  # the commands of the learning view's freeze advice (its previews are drawn there)
STOPPED = "stopped"  # the app's result when the engine acknowledged a stop from this console


class ConnectFailed(Message):
    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class RunScreen(PanelsScreen):
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
    ]

    def __init__(self) -> None:
        super().__init__()
        self._stop_timer: Timer | None = None
        self._ablation_wait: tuple[Path, int, Timer] | None = None  # the ablation waiting for the checkpoint of a step

    @property
    def session(self) -> EngineSession:
        return self.console.session

    def on_mount(self) -> None:  # before PanelsScreen.on_mount (Textual calls both), which draws the first frame
        if self.session.link is not None:
            self.header.listen(self.session.silence)
            self._connect()
        elif self.console.history:
            self.state.say(self.state.step, "ui", "engine not running: showing the run's history")

    # ------------------------------------------------------------------ engine events

    @work(thread=True, exclusive=True, group="connect")
    def _connect(self) -> None:
        try:
            self.session.connect(self)
        except ConnectionError as exc:
            self.post_message(ConnectFailed(str(exc)))

    def on_connect_failed(self, message: ConnectFailed) -> None:
        self.state.detach(unreachable(message.reason, self.console.engine, self.console.run_dir))
        self._frame(measured=False)

    def on_events_arrived(self, _: EventsArrived) -> None:
        arrivals = self.session.take_events()
        if not self.is_attached:
            return
        if arrivals.failed or any(ev.get("type") == "hello" for ev in arrivals.answers):
            self._frame(measured=False)  # the first snapshot, or why the run cannot go on: everything, now
        else:
            if arrivals.answers:  # the user's own actions are not the watching budget's
                self.console.frames.frame_started(measured=False)
            self._frame_soon()  # what the events revised (the tree, plots, log) follows at the frame pace
        self.session.route(arrivals, self)  # each answer draws what it changed (a row's mark) at once
        if self.console.frames.held and not any(
            (c.rows or c.section) and not c.received for c in self.session.commands.in_flight.values()
        ):
            self.call_after_refresh(self.marks_drawn)  # the frame held for the marks follows them
        if arrivals.failed:  # the run cannot go on: show why, whichever panel was up
            self.action_show_panel("log")
            self.notify(arrivals.failed, title="engine error", severity="error", timeout=10)

    def command_received(self, command: PendingCommand) -> None:
        """The engine has the change: rows and sections show it is queued for the next boundary."""
        if command.name not in ("change", "schedule", "unschedule"):
            return
        if command.rows:
            self.unit_tree.change_received(command.rows)
            self.call_after_refresh(self.console.round_trips.received_drawn, command.sent)
        if command.section:
            self.controls.change_received(command.section)

    def command_previewed(self, command: PendingCommand, preview: PreviewEvent) -> None:
        if command.section == ADVICE:
            self.learning.show_preview(preview)
        elif command.section is not None:
            self.controls.show_preview(command.section, preview)

    def command_acknowledged(self, command: PendingCommand, ack: dict[str, Any]) -> None:
        ok, message = bool(ack.get("ok")), ack.get("message", "")
        if command.name == "stop":
            if ok:
                self.app.exit(result=STOPPED)  # the engine took the stop (after its checkpoint, if asked for)
                return
            if self._stop_timer is not None:  # e.g. the checkpoint could not be written: the run goes on, and so do we
                self._stop_timer.stop()
            self._say(f"stop refused: {message}", error=True)
        if command.rows or command.section:
            self.console.frames.answered()
            self._reschedule()
        if command.rows:
            self.unit_tree.change_answered(command.rows)
            if ok:
                self.call_after_refresh(self.console.round_trips.applied_drawn, command.sent, ack.get("t", time.time()))
            else:
                self._say(f"{command.name} refused: {message}", error=True, logged=True)
        if command.name in ("schedule", "unschedule"):
            self.controls.schedule_answered(command.name == "schedule", ok, message)
            self.controls.show(self.state)  # the list the key changed, at once (the frame that follows waits a beat)
        elif command.section:
            step = ack.get("step", self.state.step)
            self.controls.acknowledged(command.section, ok, step, message, self.state.policy)
        if command.name == "undo":
            self._say(f"undo: {message}" if ok else f"undo refused: {message}", error=not ok)

    def checkpoint_written(self, step: int) -> None:
        """The engine wrote a checkpoint: the ablation waiting for this step's starts."""
        if self._ablation_wait is not None and self._ablation_wait[1] == step:
            run_dir, _, timer = self._ablation_wait
            timer.stop()
            self._ablation_wait = None
            self._ablate(run_dir, step)

    # ------------------------------------------------------------------ user actions

    def _send(self, cmd: str, rows: list[Row] | None = None, section: str | None = None, **fields: Any) -> bool:
        """Send ``cmd`` through the session, which follows it until the engine answers; False (said to the user) when
        no engine takes it."""
        try:
            self.session.send(cmd, rows=rows, section=section, **fields)
        except NotSent as exc:
            self._say(f"{cmd}: {exc}", error=True)
            return False
        return True

    def on_unit_tree_change_requested(self, message: UnitTree.ChangeRequested) -> None:
        self._send_freeze(message.change, message.rows)

    def _send_freeze(self, change: Change, rows: list[Row]) -> None:
        """A freeze change whose rows in the unit tree show it on its way until the engine answers."""
        if self._send("change", rows=rows, change=wire(change)):
            self.key_first()
            self.unit_tree.change_sent(rows)

    def on_apply_requested(self, message: ApplyRequested) -> None:
        if self._send("change", section=message.section, change=wire(message.change)):
            self.key_first()
            self.controls.change_sent(message.section)

    def on_controls_panel_schedule_requested(self, message: ControlsPanel.ScheduleRequested) -> None:
        if self._send("schedule", section="triggers", entry=message.entry):
            self.key_first()
            self.controls.change_sent("triggers")

    def on_controls_panel_unschedule_requested(self, message: ControlsPanel.UnscheduleRequested) -> None:
        if self._send("unschedule", section="triggers", entry=message.entry):
            self.key_first()
            self.controls.change_sent("triggers")

    def on_preview_requested(self, message: PreviewRequested) -> None:
        self.session.preview(message.change, message.section)

    def action_freeze_advice(self) -> None:
        """The learning view's advice: the first `v` previews freezing the settled front blocks, the next applies it (a
        console change like `f`, so `z` undoes it)."""
        view = self.learning
        change = view.advice_change()
        if change is None:
            self._say(
                "freeze advice: no front block has settled yet (the advisor reads the learning panel's statistics)"
            )
            return
        if view.proposed != change:
            if not self.session.connected:
                self._say("freeze advice: no engine connected", error=True)
                return
            self.session.preview(change, ADVICE)
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
        self._send("resume" if self.state.state == RunState.PAUSED else "pause")

    def action_checkpoint(self) -> None:
        if self._send("checkpoint"):
            self._say("checkpoint requested (written at the next step boundary)")

    def action_evaluate(self) -> None:
        if self._send("evaluate"):
            self._say("evaluation requested (runs at the next step boundary)")

    def action_ablate(self) -> None:
        """Houlsby et al.'s Fig. 6 on this run: its checkpoint evaluated without each block's adapters, in a process of
        its own (`spu ablate`), so neither the console nor the run waits; a paused run is checkpointed first, and the
        ablation starts when the engine says the checkpoint is written."""
        spec = ablated_method()
        if spec is None:
            self._say("ablate: no registered method has an ablation", error=True)
            return
        values = self.state.policy.get(spec.section, {})
        if not spec.in_use(values):
            self._say(f"ablate: removes {spec.ablates}, and this run has none ({spec.switch_text(values)})", error=True)
            return
        live = self.session.live
        if live and self.state.state != RunState.PAUSED:
            self._say(
                "ablate: pause the run first (p): the ablation evaluates the model as it stands, from a checkpoint",
                error=True,
            )
            return
        checkpoint = live and self.state.checkpoint_step != self.state.step
        if checkpoint and not self._send("checkpoint"):
            return
        self._say("ablate: evaluating without each block's adapters, then each span of blocks (the run is unchanged)")
        run_dir = Path(self.state.run_dir or self.console.run_dir)
        if checkpoint:
            self._await_checkpoint(run_dir, self.state.step)
        else:
            self._ablate(run_dir, self.state.step if live else None)

    def _await_checkpoint(self, run_dir: Path, step: int) -> None:
        """The ablation starts when the checkpoint of ``step`` is written (``checkpoint_written``), or gives up."""

        def given_up() -> None:
            self._ablation_wait = None
            self._say(f"ablate: no checkpoint of step {step} after {ABLATE_CHECKPOINT_WAIT:.0f} s", error=True)

        if self._ablation_wait is not None:
            self._ablation_wait[2].stop()
        self._ablation_wait = (run_dir, step, self.set_timer(ABLATE_CHECKPOINT_WAIT, given_up))

    @work(thread=True, exclusive=True, group="ablate")
    def _ablate(self, run_dir: Path, step: int | None) -> None:
        try:
            report = ablate(run_dir)
        except AblationFailed as exc:
            self.app.call_from_thread(self._say, f"ablate: {exc}", True)
            return
        self.app.call_from_thread(self.app.push_screen, AblationScreen(report, step))

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
        dialog = QuitScreen(self.session.live, self.state.state, self.state.run_dir or str(self.console.run_dir))
        self.app.push_screen(dialog, self._quit_chosen)

    def _quit_chosen(self, choice: str | None) -> None:
        if choice == "detach":
            self.app.exit()
        elif choice in ("stop_checkpoint", "stop_now"):
            if not self._send("stop", checkpoint=choice == "stop_checkpoint"):
                self.app.exit()
                return
            written = " and write a checkpoint" if choice == "stop_checkpoint" else ""
            self._say(f"stopping: waiting for the engine to finish the current step{written}")
            self._stop_timer = self.set_timer(STOP_TIMEOUT, self.app.exit)
