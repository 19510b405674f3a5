"""Time as the console tells it: rates on the training clock, the startup said from the first frame, a finished run's
last machine reading shown with its age."""

from __future__ import annotations

import re
import time

from textual.widgets import Static

from spu_tui.app import SpuApp
from spu_tui.run_model import RunModel
from spu_tui.widgets.system_view import SystemView
from support import ScriptedLink, screen_lines, small_sst2


def steps(first: int, last: int, t0: float, step_time: float, batch: int) -> list[dict]:
    """Step events of ``step_time`` seconds each, back to back from wall time ``t0``."""
    return [
        {
            "type": "step",
            "t": t0 + (s - first + 1) * step_time,
            "step": s,
            "loss": 0.5,
            "step_time": step_time,
            "samples": s * batch,
        }
        for s in range(first, last + 1)
    ]


def test_samples_per_s_and_eta_count_training_time_only():
    """A 10-minute pause and a 30 s evaluation in the window: the rate stays training steps over training time."""
    state = RunModel()
    state.apply({"type": "hello", "t": 0.0, "state": "training", "step": 0, "total_steps": 100})
    for ev in steps(1, 5, 0.0, 0.5, 8):
        state.apply(ev)
    state.apply({"type": "state", "t": 3.0, "state": "paused", "step": 5})
    state.apply({"type": "state", "t": 603.0, "state": "training", "step": 5})
    state.apply({"type": "eval", "t": 633.0, "step": 5, "eval_loss": 0.4, "accuracy": 0.8})
    for ev in steps(6, 10, 633.0, 0.5, 8):
        state.apply(ev)
    assert state.samples_per_s == 16.0  # 8 samples every 0.5 s of training
    assert state.seconds_per_step == 0.5
    assert state.eta_s == 90 * 0.5


def test_after_a_resume_the_rate_starts_from_the_resumed_step():
    state = RunModel()
    for ev in steps(1, 4, 0.0, 1.0, 4):  # 4 samples/s before the crash
        state.apply(ev)
    state.apply({"type": "resumed", "t": 5000.0, "step": 4})
    for ev in steps(5, 8, 5000.0, 0.25, 4):  # 16 samples/s after it
        state.apply(ev)
    assert state.samples_per_s == 16.0


async def test_the_first_frame_says_the_engine_is_starting_before_any_engine_event(tmp_path):
    link = ScriptedLink()
    app = SpuApp(tmp_path / "run", link=link)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert re.search(r"starting the engine \(\d+ s\)", screen_lines(app)[1])
        began = time.time() - 70  # the phase began before this console attached: its seconds count from then
        link.deliver(
            {"type": "state", "t": began, "state": "loading", "phase": "model", "message": "loading the model m"}
        )
        await pilot.pause(0.2)
        seconds = re.search(r"loading the model m \((\d+) s\)", screen_lines(app)[1])
        assert seconds and int(seconds[1]) >= 70


def test_the_engine_says_its_startup_phases_in_order_before_the_first_step(tmp_path, tiny_model_dir):
    """``spu engine``'s serve, in process: every phase is recorded in events.jsonl (an attach mid-startup reads it)."""
    from spu_engine.core.config import EngineConfig
    from spu_engine.core.policy import Policy
    from spu_engine.core.runs import read_history
    from spu_engine.loop.serve import serve

    data = small_sst2(tmp_path)
    config = EngineConfig(model=str(tiny_model_dir), data=str(data), steps=2, batch_size=4, eval_every=0)
    assert serve(config, Policy(), tmp_path / "run") == 0
    history = read_history(tmp_path / "run")
    first_step = next(i for i, ev in enumerate(history) if ev["type"] == "step")
    phases = [ev["phase"] for ev in history[:first_step] if ev["type"] == "state" and ev.get("phase")]
    assert phases == ["engine", "data", "model", "optimizer"]


def finished_history(sampled: float) -> list[dict]:
    """A finished run whose engine's last system sample is from wall time ``sampled``."""
    return [
        {"type": "hello", "t": sampled - 60, "state": "training", "step": 0, "total_steps": 4, "config": {}},
        *steps(1, 4, sampled - 60, 1.0, 8),
        {"type": "system", "t": sampled, "step": 4, "seconds": 4.0, "cpu_process": 90.0, "rss": int(1.1 * 2**30)},
        {"type": "state", "t": sampled + 1, "state": "finished", "step": 4, "message": "4 steps"},
    ]


async def test_a_finished_run_shows_its_last_machine_reading_with_its_age(tmp_path):
    app = SpuApp(tmp_path / "run", history=finished_history(time.time() - 300), connect=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause()
        assert re.search(r"last reading 5m0\ds ago: CPU 90% · RAM 1\.1G", screen_lines(app)[0])
        await pilot.press("6")  # the System panel, wherever the layout puts it
        await pilot.pause()
        assert "the engine's last reading, at" in str(app.query_one(SystemView).render())


async def test_the_quit_dialog_of_a_finished_run_says_what_quitting_does(tmp_path):
    app = SpuApp(tmp_path / "run", history=finished_history(time.time()), connect=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("q")
        await pilot.pause()
        said = str(app.screen.query_one(Static).render())
        assert "This run has finished and its engine has exited" in said
        assert f"spu-tui attach {tmp_path / 'run'}" in said
        assert any("q  Close the console" in line for line in screen_lines(app))
        await pilot.press("q")
        await pilot.pause()
    assert app.return_value is None and not app.is_running


def test_the_engine_saying_it_starts_keeps_the_seconds_the_console_counted():
    state = RunModel()
    state.starting(100.0)
    state.apply({"type": "state", "t": 104.0, "state": "loading", "phase": "engine", "message": "starting the engine"})
    assert (state.waiting, state.waiting_since) == ("starting the engine", 100.0)
    state.apply({"type": "state", "t": 105.0, "state": "loading", "phase": "data", "message": "tokenizing d"})
    assert (state.waiting, state.waiting_since) == ("tokenizing d", 105.0)
    assert [line.text for line in state.log] == []  # phases go to the header, not the log
