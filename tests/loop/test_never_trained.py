"""A run that ended before its first step (SIGTERM while the model loaded) holds nothing to resume and nothing to
lose, and every command says the same: ``spu runs`` suggests no resume, ``--resume`` says there is nothing to resume,
``--run-dir`` takes the folder without --overwrite."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.protocol import encode, event
from spu_engine.core.runs import never_trained, run_info

STOPPED = "SIGTERM: stopped while loading; nothing was trained"
LOADING = [
    ("hello", {"state": "loading", "step": 0, "run": "run"}),
    ("state", {"state": "loading", "step": 0, "message": "starting the engine"}),
]


def _folder(tmp_path, events, config: bool = False):
    """What the engine leaves: ``spu train`` writes config.json only once training starts; spu-tui writes it first."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_bytes(b"".join(encode(event(kind, **fields)) for kind, fields in events))
    (run / "engine.lock").write_text("123")
    if config:
        (run / "config.json").write_text(json.dumps({"steps": 10}))
    return run


@pytest.fixture
def stopped_while_loading(tmp_path):
    return _folder(tmp_path, [*LOADING, ("state", {"state": "stopped", "step": 0, "message": STOPPED})])


def test_a_run_stopped_while_loading_never_trained_and_spu_runs_suggests_no_resume(stopped_while_loading):
    run = stopped_while_loading
    assert never_trained(run)
    info = run_info(run)
    assert (info.state, info.trained) == ("stopped", False)
    result = CliRunner().invoke(app, ["runs", str(run.parent)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--resume" not in result.output  # before: "continue a crashed or stopped run ...: spu train --resume"
    assert "never trained: nothing to resume" in result.output


def test_resume_says_it_never_trained_not_that_it_is_no_run_folder(stopped_while_loading):
    run = stopped_while_loading
    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 2
    assert f"{run} never trained (its run ended before the first step): there is nothing to resume" in result.output
    assert "not a run folder" not in result.output and f"spu train --run-dir {run}" in result.output


def test_run_dir_takes_a_folder_that_never_trained_without_overwrite(stopped_while_loading, monkeypatch):
    from spu_engine.loop import serve as serving

    run = stopped_while_loading
    started: dict = {}

    def serve(config, policy, run_dir, **how):
        started.update(run_dir=run_dir, **how)
        return 0

    monkeypatch.setattr(serving, "serve", serve)
    result = CliRunner().invoke(
        app, ["train", "--model", "tiny", "--data", "x.tsv", "--task", "classification", "--run-dir", str(run)]
    )
    assert result.exit_code == 0, result.output  # before: "already holds a run; continue it with --resume"
    assert started["run_dir"] == run and started["overwrite"] is True  # its old log is cleared under the lock
    assert f"note: {run} holds a run that never trained; starting this one there" in result.output


@pytest.mark.parametrize(
    "events, checkpoint",
    [
        ([*LOADING, ("state", {"state": "training", "step": 0}), ("step", {"step": 1, "loss": 0.5})], False),
        ([*LOADING, ("resumed", {"step": 4})], False),
        ([*LOADING, ("state", {"state": "stopped", "step": 0, "message": STOPPED})], True),
    ],
    ids=["a step", "a resume", "a checkpoint"],
)
def test_a_run_with_a_step_or_a_checkpoint_trained(tmp_path, events, checkpoint):
    run = _folder(tmp_path, events, config=True)
    if checkpoint:
        (run / "checkpoints" / "step-0000002").mkdir(parents=True)
    assert not never_trained(run) and run_info(run).trained
    result = CliRunner().invoke(app, ["train", "--model", "tiny", "--data", "x.tsv", "--run-dir", str(run)])
    assert result.exit_code == 2 and "already holds a run" in result.output


def test_a_folder_spu_tui_prepared_whose_engine_died_loading_never_trained(tmp_path):
    run = _folder(tmp_path, LOADING, config=True)  # killed (SIGKILL) while loading: "crashed", nothing trained
    (run / "policy.yaml").write_text("{}\n")
    assert never_trained(run) and run_info(run).state == "crashed" and not run_info(run).trained


def test_spu_tui_takes_a_folder_that_never_trained_and_starts_it_clean(stopped_while_loading, monkeypatch, tmp_path):
    from types import SimpleNamespace

    import spu_engine.core.spawn
    import spu_tui.app
    from spu_tui.cli import app as console
    from support import SST2

    run = stopped_while_loading
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    seen = {}

    def spawn(config, policy, run_dir):
        seen["events"] = (run_dir / "events.jsonl").exists()
        return SimpleNamespace(poll=lambda: None)

    monkeypatch.setattr(spu_engine.core.spawn, "spawn_engine", spawn)
    monkeypatch.setattr(spu_tui.app.SpuApp, "run", lambda self: None)
    args = ["--model", str(model), "--data", str(SST2), "--task", "classification", "--run-dir", str(run)]
    result = CliRunner().invoke(console, args)
    assert result.exit_code == 0, result.output  # before: "already holds a run; open it with spu-tui attach"
    assert seen == {"events": False}  # the old run's log went first: the new run's history is its own
