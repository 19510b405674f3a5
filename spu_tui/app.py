"""The console: a ``RunScreen`` over what it knows of one run, steering that run's engine process.

The app only holds the run: its ``RunModel`` (with the history already drawn
from ``events.jsonl``), the ``EngineSession`` with the run's engine (the link,
the commands on their way), and the frame budget.  The screen does the rest.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from textual.app import App

from spu_engine.core.runs import is_live, read_history
from spu_tui.compare import ComparedRun
from spu_tui.frames import DEFAULT_SHARE, FrameBudget
from spu_tui.latency import RoundTrips
from spu_tui.link import EngineLink
from spu_tui.run_model import RunModel
from spu_tui.screens.run import STOPPED, RunScreen
from spu_tui.screens.runs import RunsChoice, RunsScreen
from spu_tui.session import CommandTracker, EngineSession, Link


class SpuApp(App[str]):
    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute, so subclasses elsewhere find it
    TITLE = "SPU"
    ENABLE_COMMAND_PALETTE = False

    def __init__(
        self,
        run_dir: Path,
        *,
        history: list[dict[str, Any]] | None = None,
        engine: subprocess.Popen | None = None,
        connect: bool = True,
        link: Link | None = None,
        cpu_share: float = DEFAULT_SHARE,
        compare: list[Path] | None = None,
    ) -> None:
        """``connect``: open the engine socket of ``run_dir`` (``link``: talk to the engine through this one instead);
        ``compare``: run folders whose losses and evaluations are drawn beside this run's."""
        super().__init__()
        self.engine = engine  # the process we started, if any (attach leaves it None)
        self._take_run(Path(run_dir), history or [], link or (EngineLink(Path(run_dir)) if connect else None))
        self.frames = FrameBudget(cpu_share)
        self.round_trips = RoundTrips()
        self.compared = [ComparedRun(p) for p in compare or []]

    def _take_run(self, run_dir: Path, history: list[dict[str, Any]], link: Link | None) -> None:
        self.run_dir = run_dir
        self.history = [ev for ev in history if isinstance(ev, dict)]
        self.state = RunModel(run=self.run_dir.name, run_dir=str(self.run_dir))
        self.state.metrics.name = self.run_dir.name  # the folder, as the run browser and the compared runs name it
        if link is not None and not self.history:  # a new run: its engine is starting
            self.state.starting(time.time())
        for ev in self.history:
            self.state.apply(ev)
        self.session = EngineSession(self.state, link, self.history)

    @property
    def link(self) -> Link | None:
        """The session's link to the engine (None: the run is shown from its history)."""
        return self.session.link

    @property
    def commands(self) -> CommandTracker:
        """The session's commands on their way to the engine."""
        return self.session.commands

    def open_run(self, run_dir: Path, compare: list[Path]) -> None:
        """Show another run instead (the run browser's enter): a live one attached, any other read-only from its history.

        Nothing of the run left behind changes; an engine this console started trains on."""
        self.session.close()
        if self.engine is not None and self.run_dir.resolve() != Path(run_dir).resolve():
            self.engine = None  # it trains on in its own session; its run can be attached again
        live = is_live(run_dir)
        self._take_run(Path(run_dir), read_history(run_dir), EngineLink(Path(run_dir)) if live else None)
        self.compared = [ComparedRun(p) for p in compare]
        if len(self.screen_stack) > 1:  # a run opened before: its screen goes
            self.switch_screen(RunScreen())
        else:  # the first run's screen is the app's default, which cannot be switched away: it rests below, inert
            if isinstance(self.screen, RunScreen):
                self.screen.pause_following()
            self.push_screen(RunScreen())

    def get_default_screen(self) -> RunScreen:
        return RunScreen()

    @property
    def stopped_engine(self) -> bool:
        """The engine acknowledged a stop from this console."""
        return self.return_value == STOPPED

    def on_unmount(self) -> None:
        self.session.close()


class RunsApp(App[RunsChoice | None]):
    """``spu-tui runs``: the run browser alone; its choice (a run to open, runs to compare) is the app's result."""

    CSS_PATH = SpuApp.CSS_PATH
    TITLE = "SPU runs"
    ENABLE_COMMAND_PALETTE = False

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = Path(root)

    def on_mount(self) -> None:
        self.push_screen(RunsScreen(self.root), self.exit)
