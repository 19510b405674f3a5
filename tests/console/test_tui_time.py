"""Time as the console tells it: rates on the training clock, the startup said from the first frame, a finished run's
last machine reading shown with its age."""

from __future__ import annotations

from spu_tui.run_model import RunModel


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
