"""A silent engine is said: when an attached engine sends nothing for a few seconds (not even its heartbeat), the
header says how long and the last step heard instead of an ETA, and goes back to the ETA when the engine speaks."""

from __future__ import annotations

import time

from spu_engine.core.protocol import HEARTBEAT_S
from spu_tui.app import SpuApp
from spu_tui.session import SILENT_AFTER_S
from support import ScriptedLink, screen_lines


class TurnedClock:
    """The session's clock, turned by the test: how long the engine has been silent is the test's to say."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _training(t: float) -> list[dict]:
    hello = {"type": "hello", "t": t, "state": "training", "step": 748, "total_steps": 5000, "config": {}}
    steps = [
        {"type": "step", "t": t + i, "step": 748 + i, "loss": 0.5, "step_time": 0.25, "samples": (748 + i) * 8}
        for i in range(1, 3)
    ]
    return [hello, *steps]


async def _header(app, pilot) -> str:
    await pilot.pause(1.3)  # the header asks the session every second
    return screen_lines(app)[1]


async def test_the_header_says_a_silent_engine_and_recovers(tmp_path):
    link = ScriptedLink()
    app = SpuApp(tmp_path / "run", link=link)
    app.session.clock = clock = TurnedClock()
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        link.deliver(*_training(time.time()))
        await pilot.pause(0.2)
        line = await _header(app, pilot)
        assert "step 750/5000" in line and "ETA" in line and "silent" not in line

        clock.now += SILENT_AFTER_S + 6  # the engine stopped (SIGSTOP): not a line since
        line = await _header(app, pilot)
        assert f"engine silent for {SILENT_AFTER_S + 6:.0f} s — last heard at step 750" in line
        assert "ETA" not in line

        link.deliver({"type": "heartbeat", "t": time.time()})  # SIGCONT: its heartbeat (or anything) is heard
        await pilot.pause(0.2)
        line = await _header(app, pilot)
        assert "silent" not in line and "ETA" in line


async def test_paused_heartbeats_keep_an_engine_from_being_called_silent(tmp_path):
    link = ScriptedLink()
    app = SpuApp(tmp_path / "run", link=link)
    app.session.clock = clock = TurnedClock()
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        link.deliver(*_training(time.time()), {"type": "state", "t": time.time(), "state": "paused", "step": 750})
        for _ in range(4):  # a paused engine sends nothing but its heartbeat
            clock.now += HEARTBEAT_S
            link.deliver({"type": "heartbeat", "t": time.time()})
            await pilot.pause(0.1)
        line = await _header(app, pilot)
        assert "paused" in line and "silent" not in line


async def test_an_attach_that_hears_nothing_says_so_over_the_history(tmp_path):
    history = _training(time.time() - 3600)  # a run that trained, then its engine stopped answering
    link = ScriptedLink()
    app = SpuApp(tmp_path / "run", link=link, history=history)
    app.session.clock = clock = TurnedClock()
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        clock.now += SILENT_AFTER_S + 1
        line = await _header(app, pilot)
        assert f"engine silent for {SILENT_AFTER_S + 1:.0f} s — nothing heard since attaching" in line
        assert "ETA" not in line
