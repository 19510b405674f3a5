"""A real engine stopped with SIGSTOP is said to be silent by the console's session, and heard again after SIGCONT."""

from __future__ import annotations

import os
import signal
import time

import pytest

from spu_engine.core.policy import Policy
from spu_engine.core.spawn import spawn_engine
from spu_engine.loop.engine import EngineConfig
from spu_tui.link import EngineLink
from spu_tui.run_model import RunModel
from spu_tui.session import SILENT_AFTER_S, EngineSession
from support import SST2

pytestmark = [
    pytest.mark.process,
    pytest.mark.slow,
]  # a real engine stopped for seconds; test_tui_silence.py is the default set's


class NoScreen:
    """The link's wake-up target, with no UI to wake: the test drains the session itself."""

    def post_message(self, message) -> bool:
        return True


def _until(session: EngineSession, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        session.take_events()
        time.sleep(0.1)


def test_a_stopped_engine_is_silent_and_a_continued_one_is_heard(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = EngineConfig(
        model=str(tiny_model_dir), data=str(SST2), steps=5000, batch_size=8, max_length=32, eval_every=0,
        max_train_samples=64, max_eval_samples=16, threads=1,
    )  # fmt: skip
    proc = spawn_engine(config, Policy(), run_dir)
    model = RunModel()
    session = EngineSession(model, EngineLink(run_dir), [])
    try:
        session.connect(NoScreen())
        _until(session, lambda: model.step >= 2, 60)
        assert session.silence() == ""
        os.kill(proc.pid, signal.SIGSTOP)
        _until(session, lambda: session.silence() != "", SILENT_AFTER_S + 10)
        heard = session.heard_step
        assert session.silence().startswith("engine silent for ")
        assert session.silence().endswith(f" s — last heard at step {heard}") and heard >= 2
        os.kill(proc.pid, signal.SIGCONT)
        _until(session, lambda: session.silence() == "" and model.step > heard, 30)
        session.send("stop", checkpoint=False)
        assert proc.wait(60) == 0
    finally:
        session.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(10)
