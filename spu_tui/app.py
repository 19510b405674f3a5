"""The console: a ``RunScreen`` over what it knows of one run, steering that run's engine process.

The app only holds the run: its ``RunState`` (with the history already drawn
from ``events.jsonl``), the link to the engine, the commands on their way, and
the frame budget.  The screen does the rest.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from textual.app import App

from .commands import CommandTracker
from .frames import DEFAULT_SHARE, FrameBudget
from .latency import RoundTrips
from .link import EngineLink, Link
from .run_state import RunState
from .screens.run import STOPPED, RunScreen


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
    ) -> None:
        """``connect``: open the engine socket of ``run_dir`` (``link``: talk to the engine through this one instead)."""
        super().__init__()
        self.run_dir = Path(run_dir)
        self.engine = engine  # the process we started, if any (attach leaves it None)
        self.history = [ev for ev in history or [] if isinstance(ev, dict)]
        self.history_t = max((t for ev in self.history if isinstance(t := ev.get("t"), (int, float))), default=0.0)
        self.state = RunState(run=self.run_dir.name, run_dir=str(self.run_dir))
        for ev in self.history:
            self.state.apply(ev)
        self.link: Link | None = link or (EngineLink(self.run_dir) if connect else None)
        self.commands = CommandTracker()
        self.frames = FrameBudget(cpu_share)
        self.round_trips = RoundTrips()

    def get_default_screen(self) -> RunScreen:
        return RunScreen()

    def seen_in_history(self, ev: dict[str, Any]) -> bool:
        """A live event already drawn from events.jsonl (a hello is a fresh snapshot, never one of those)."""
        t = ev.get("t")
        return ev.get("type") != "hello" and isinstance(t, (int, float)) and t <= self.history_t

    @property
    def stopped_engine(self) -> bool:
        """The engine acknowledged a stop from this console."""
        return self.return_value == STOPPED

    def on_unmount(self) -> None:
        if self.link is not None:
            self.link.close()
