"""A run whose config.json was deleted still resumes: the settings come from its newest checkpoint's state.json
(said, and written back), as ``spu runs`` reads them too."""

from __future__ import annotations

import json

import pytest
import typer

from spu_engine.core.run_setup import read_run_config
from spu_engine.core.runs import checkpoint_config, run_info

SETTINGS = {"model": "tiny", "data": "d", "steps": 40, "batch_size": 8}


def _run(tmp_path):
    run = tmp_path / "run"
    for step, state in ((2, {"config": {**SETTINGS, "steps": 20}}), (4, {"config": SETTINGS}), (6, None)):
        folder = run / "checkpoints" / f"step-{step:07d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps(state) if state else "{cut sho")  # step 6: damaged
    (run / "checkpoints" / "unusable").mkdir()
    (run / "events.jsonl").write_text(json.dumps({"type": "step", "step": 4, "loss": 0.5}) + "\n")
    return run


def test_a_missing_config_json_is_taken_from_the_newest_readable_checkpoint(tmp_path, capsys):
    run = _run(tmp_path)
    assert checkpoint_config(run) == (SETTINGS, run / "checkpoints" / "step-0000004")
    assert read_run_config(run) == SETTINGS and not (run / "config.json").exists()  # a reader writes nothing
    assert read_run_config(run, restore=True) == SETTINGS
    assert json.loads((run / "config.json").read_text()) == SETTINGS
    said = capsys.readouterr().err
    assert f"note: {run / 'config.json'} is missing; the run's settings are taken from step-0000004/state.json" in said
    assert "; config.json is written anew from them" in said
    assert read_run_config(run) == SETTINGS and capsys.readouterr().err == ""  # written back: no note again


def test_spu_runs_reads_the_total_steps_from_the_checkpoint(tmp_path):
    assert run_info(_run(tmp_path)).total_steps == 40


def test_no_config_json_and_no_checkpoint_is_still_not_a_run_folder(tmp_path, capsys):
    (tmp_path / "events.jsonl").write_text("")
    with pytest.raises(typer.Exit):
        read_run_config(tmp_path)
    assert f"{tmp_path} is not a run folder (no config.json, and no checkpoint holding its settings)" in (
        capsys.readouterr().err
    )
