"""A console run with live changes, exported, replays alone: same per-step losses, same weights.

The live run is a real engine process steered under Pilot; the replay is
``spu train --policy export.yaml`` with no other flag, so every run setting
comes from the export's ``run:`` section.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spu_engine.core.policy import Policy
from spu_engine.core.policy_files import load_policy
from spu_engine.core.spawn import spawn_engine
from spu_engine.loop.engine import EngineConfig
from spu_tui.app import SpuApp
from spu_tui.screens.export import ExportScreen
from support import SST2, events_of, wait_for

pytestmark = pytest.mark.process  # every test here starts an engine process

STEPS = 60
# every setting off its default, so a replay that fell back to a default would differ
LIVE = {
    "steps": STEPS,
    "batch_size": 8,
    "max_length": 32,
    "lr": 2e-3,
    "warmup": 5,
    "weight_decay": 0.02,
    "grad_clip": 0.5,
    "seed": 3,
    "eval_every": 20,
    "max_eval_samples": 16,
    "max_train_samples": 64,
    "stats_every": 2,
    "threads": 1,
}


@pytest.fixture
def live_engine(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "live"
    proc = spawn_engine(EngineConfig(model=str(tiny_model_dir), data=str(SST2), **LIVE), Policy(), run_dir)
    yield proc, run_dir
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


async def test_console_run_with_three_live_changes_replays_alone_with_the_same_losses(live_engine, tmp_path):
    proc, run_dir = live_engine
    app = SpuApp(run_dir, engine=proc)

    async def paused_change(apply, what: str) -> int:
        """Pause, make one change, resume a few steps later; returns the step it applied at."""
        await pilot.press("p")
        await wait_for(pilot, lambda: app.state.state == "paused", "pause")
        assert app.state.step < STEPS - 10, "the engine ran too far before the console could pause it"
        before = len(events_of(run_dir, "policy"))
        await apply()
        await wait_for(
            pilot,
            lambda: not app.commands.in_flight and len(events_of(run_dir, "policy")) > before,
            f"the engine to apply {what}",
        )
        step = events_of(run_dir, "policy")[-1]["step"]
        await pilot.press("p")
        await wait_for(pilot, lambda: app.state.step >= step + 3, f"training after {what}")
        return step

    async def freeze_block0():
        await pilot.press("down", "space")  # cursor on block0

    async def sb_percentile():
        app.query_one("#sb-mode").value = "percentile"
        await pilot.pause(0.1)
        app.query_one("#apply-selective_backprop").press()  # a choice only previews until applied

    async def magnitude_pruning():
        app.query_one("#pr-end").value = str(STEPS // 2)
        app.query_one("#pr-method").value = "magnitude"
        await pilot.pause(0.1)
        app.query_one("#apply-pruning").press()

    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.state.units and app.state.state == "training", "the engine to train")
        steps = [
            await paused_change(freeze_block0, "the freeze"),
            await paused_change(sb_percentile, "selective backprop"),
            await paused_change(magnitude_pruning, "pruning"),
        ]
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, ExportScreen), "the export dialog")
        await pilot.press("enter")  # the default path, written by the engine (socket export command)
        exported = run_dir / "policy-export.yaml"
        await wait_for(pilot, exported.exists, "the exported policy")
        await wait_for(pilot, lambda: app.state.state == "finished", "the live run to finish", timeout=300)
    proc.wait(timeout=60)

    changes = [(e["step"], e["source"], e["change"]) for e in events_of(run_dir, "policy")]
    assert [step for step, *_ in changes] == steps and len(set(steps)) == 3
    assert changes[0][2]["freeze"] == [{"units": ["block0"], "trainable": False}]
    assert changes[1][2]["set"]["selective_backprop"]["mode"] == "percentile"
    assert changes[2][2]["set"]["pruning"]["method"] == "magnitude"
    policy = load_policy(exported)
    assert policy.run is not None and policy.run.steps == STEPS and policy.run.seed == 3 and policy.run.warmup == 5
    assert [e.step for e in policy.timeline] == steps

    replay_dir = tmp_path / "replay"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the live engine ran on one thread; float sums depend on the split
    replay = subprocess.run(
        [sys.executable, "-m", "spu_engine.cli", "train", "--policy", str(exported), "--run-dir", str(replay_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert "override" not in replay.stderr

    def losses(folder: Path) -> list[tuple[int, float]]:
        return [(e["step"], e["loss"]) for e in events_of(folder, "step")]

    live, again = losses(run_dir), losses(replay_dir)
    assert [s for s, _ in live] == list(range(1, STEPS + 1))
    assert again == live
    assert [(e["step"], e["change"]) for e in events_of(replay_dir, "policy")] == [(s, c) for s, _, c in changes]
    assert list(events_of(replay_dir, "eval")) != [] and [
        {k: v for k, v in e.items() if k != "t"} for e in events_of(replay_dir, "eval")
    ] == [{k: v for k, v in e.items() if k != "t"} for e in events_of(run_dir, "eval")]
    assert any(e.get("sb_kept_fraction", 1.0) < 1.0 for e in events_of(run_dir, "step")), (
        "selective backprop skipped samples"
    )
    final = f"checkpoints/step-{STEPS:07d}/model.safetensors"
    live_w, replay_w = load_file(str(run_dir / final)), load_file(str(replay_dir / final))
    assert live_w.keys() == replay_w.keys()
    for name in live_w:
        assert torch.equal(live_w[name], replay_w[name]), name
    assert any((w == 0).float().mean() > 0.2 for n, w in live_w.items() if "block1" in n or "layer.1." in n), (
        "pruning masked weights"
    )
    assert json.loads((replay_dir / "config.json").read_text())["warmup"] == 5
