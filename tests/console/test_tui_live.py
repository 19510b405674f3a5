"""The console against a real engine process (tiny BERT, a slice of SST-2).

Every claim is checked on the engine's side: its events.jsonl, its policy.yaml,
its process, a replay by ``spu train`` -- never only on what the UI shows.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from spu_engine.core.policy import Policy
from spu_engine.core.policy_files import load_policy
from spu_engine.core.runs import is_live, read_history
from spu_engine.core.spawn import spawn_engine
from spu_engine.loop.engine import EngineConfig
from spu_engine.methods import METHODS
from spu_tui.app import SpuApp
from spu_tui.screens.export import ExportScreen
from spu_tui.screens.quit import QuitScreen
from support import SST2, events_of, wait_for

pytestmark = pytest.mark.process  # every test here starts an engine process

TRAIN_ARGS = {
    "batch_size": 8,
    "max_length": 32,
    "eval_every": 0,
    "stats_every": 2,
    "lr": 1e-3,
    "warmup": 0,
    "max_eval_samples": 16,
    "threads": 1,
}


@pytest.fixture
def small_data(tmp_path) -> Path:
    folder = tmp_path / "sst2"
    folder.mkdir()
    for name, rows in (("train.tsv", 300), ("dev.tsv", 20)):
        lines = (SST2 / name).read_text(encoding="utf-8").splitlines(keepends=True)[: rows + 1]
        (folder / name).write_text("".join(lines), encoding="utf-8")
    return folder


@pytest.fixture
def engine_run(tmp_path, tiny_model_dir, small_data):
    """A live engine process training for (practically) ever; killed after the test."""
    run_dir = tmp_path / "run"
    config = EngineConfig(model=str(tiny_model_dir), data=str(small_data), steps=100_000, **TRAIN_ARGS)
    proc = spawn_engine(config, Policy(), run_dir)
    yield proc, run_dir
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def freeze_timeline(run_dir: Path) -> list[tuple[int, list]]:
    return [
        (e["step"], e["change"].get("freeze", [])) for e in events_of(run_dir, "policy") if e["change"].get("freeze")
    ]


def spu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spu_engine.cli", *args], capture_output=True, text=True, timeout=300)


async def test_toggling_block0_freezes_it_in_the_engine_and_the_export_replays(
    engine_run, tiny_model_dir, small_data, tmp_path
):
    proc, run_dir = engine_run
    app = SpuApp(run_dir, engine=proc)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.state.units and app.state.state == "training", "the engine to train")
        await pilot.press("p")
        await wait_for(pilot, lambda: app.state.state == "paused", "pause")
        await pilot.press("down", "space")  # cursor on block0
        await wait_for(pilot, lambda: not app.commands.in_flight, "the engine's ack")
        assert app.state.unit_trainable["block0"] == 0.0
        await pilot.press("p")
        change_step = events_of(run_dir, "policy")[-1]["step"]
        await wait_for(
            pilot,
            lambda: any(e["step"] > change_step + 2 for e in events_of(run_dir, "units")),
            "unit statistics after the change",
        )
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, ExportScreen), "the export dialog")
        await pilot.press("enter")  # the default path
        exported = run_dir / "policy-export.yaml"
        await wait_for(pilot, exported.exists, "the exported policy")
    proc.kill()  # frees the CPU for the replay below

    change = events_of(run_dir, "policy")[-1]
    assert change["source"] == "client" and change["change"]["freeze"] == [{"units": ["block0"], "trainable": False}]
    assert change["trainable_by_unit"]["block0"] == 0.0
    after = next(e for e in events_of(run_dir, "units") if e["step"] > change_step + 1)
    assert after["units"]["block0"]["update_ratio"] == 0.0 and after["units"]["block0"]["grad_norm"] == 0.0
    assert after["units"]["block1"]["update_ratio"] > 0.0

    validated = spu("policy", "validate", str(exported), "--model", str(tiny_model_dir))
    assert validated.returncode == 0, validated.stderr
    replay_dir = tmp_path / "replay"
    replay = spu(
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(small_data),
        "--policy",
        str(exported),
        "--run-dir",
        str(replay_dir),
        "--steps",
        str(change_step + 3),
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--eval-every",
        "0",
        "--max-eval-samples",
        "16",
    )
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert (
        freeze_timeline(replay_dir)
        == freeze_timeline(run_dir)
        == [(change_step, [{"units": ["block0"], "trainable": False}])]
    )


async def test_threshold_edit_reaches_the_engine_q_detach_keeps_it_training_and_attach_rebuilds_history(engine_run):
    proc, run_dir = engine_run
    app = SpuApp(run_dir, engine=proc)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.state.units and app.state.state == "training", "the engine to train")
        await pilot.press("4", "tab", "tab")  # controls panel; tree -> mode -> threshold
        assert app.focused is app.query_one("#sb-threshold")
        await pilot.press("0", ".", "3", "enter")
        await wait_for(pilot, lambda: not app.commands.in_flight, "the engine's ack")
        assert "applied at step" in str(app.query_one("#status-selective_backprop").render())

        # a section the engine may refuse (pruning before its method is registered): the UI says so and goes on
        app.query_one("#pr-method").value = "magnitude"
        await pilot.pause(0.1)
        app.query_one("#apply-pruning").press()  # a choice only previews until applied
        await wait_for(
            pilot,
            lambda: (
                (not app.commands.in_flight and "pruning" in str(app.query_one("#status-pruning").render()))
                or "applied" in str(app.query_one("#status-pruning").render())
            ),
            "the pruning answer",
        )
        pruning_status = app.query_one("#status-pruning")
        if "pruning" in {m.section for m in METHODS}:
            assert "applied at step" in str(pruning_status.render())
        else:
            assert "refused: pruning: not implemented" in str(pruning_status.render()) and pruning_status.has_class(
                "-error"
            )
            assert any(line.error and "pruning" in line.text for line in app.state.log)
            assert str(app.query_one("#pr-method").value) == "none", "the field returns to the engine's value"

        await pilot.press("escape", "q")
        await wait_for(pilot, lambda: isinstance(app.screen, QuitScreen), "the quit dialog")
        await pilot.press("d")
        await wait_for(pilot, lambda: not app.is_running, "the app to exit", timeout=10)

    change = next(e for e in events_of(run_dir, "policy") if "selective_backprop" in e["change"].get("set", {}))
    assert change["change"]["set"]["selective_backprop"]["threshold"] == 0.3
    assert change["policy"]["selective_backprop"]["threshold"] == 0.3
    assert load_policy(run_dir / "policy.yaml").at_step(10**9).selective_backprop.threshold == 0.3

    steps_at_exit = len(events_of(run_dir, "step"))
    time.sleep(2.0)
    assert proc.poll() is None and is_live(run_dir), "detach must leave the engine running"
    assert len(events_of(run_dir, "step")) > steps_at_exit, "the engine keeps training without a client"

    # attach again (what `spu-tui attach` does): the history is rebuilt from events.jsonl, then goes on live
    history = read_history(run_dir)
    again = SpuApp(run_dir, history=history)
    async with again.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: again.state.step > history[-1].get("step", 0), "live steps after the history")
        assert again.state.change_steps[0] == change["step"], "the policy change made before detaching is on the plot"
        assert again.state.loss_steps[: len(history)] == sorted(set(again.state.loss_steps[: len(history)]))
        assert again.state.loss_steps[0] == 1, "the loss curve starts at the first step"
        assert again.state.policy["selective_backprop"]["threshold"] == 0.3
