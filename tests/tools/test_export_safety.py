"""Exports never touch a run (issue 28, point 1).

``spu export --out RUN --force`` overwrote the run's config.json and ``--out RUN/checkpoints/step-N --force`` a
checkpoint's weights.  Here: --out at the run, a checkpoint, a file in the run, a path in it, and a symlink to each,
with and without --force, is refused and every byte of the run stays; --force replaces only a previous export;
an export killed midway leaves no --out (a re-export needs no --force); the console's policy export never
replaces a run's or a checkpoint's file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.tools.export import export_run
from support import ROOT, SST2


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A 1-step run of the tiny BERT with one checkpoint."""
    config = EngineConfig(
        model=str(tiny_model_dir),
        data=str(SST2),
        task="classification",
        steps=1,
        batch_size=4,
        max_length=16,
        max_train_samples=16,
        max_eval_samples=8,
        eval_every=0,
        warmup=0,
    )
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    engine = Engine(config, parse_policy({}), run_dir)
    engine.run()
    engine.close()
    assert list((run_dir / "checkpoints").glob("step-*"))
    return run_dir


@pytest.fixture
def run_dir(trained_run, tmp_path) -> Path:
    """A copy of the run per test: a test that fails on old code cannot damage the next one's."""
    return Path(shutil.copytree(trained_run, tmp_path / "run", symlinks=True))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def export(run: Path, out: Path, *flags: str):
    return CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(out), *flags])


def checkpoint_of(run: Path) -> Path:
    return next((run / "checkpoints").glob("step-*"))


TARGETS = {
    "run": lambda run: run,
    "checkpoint": checkpoint_of,
    "run file": lambda run: run / "config.json",
    "checkpoint file": lambda run: checkpoint_of(run) / "model.safetensors",
    "path in the run": lambda run: run / "exports" / "model",
}


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("link", [False, True], ids=["direct", "symlink"])
@pytest.mark.parametrize("where", list(TARGETS))
def test_out_in_a_run_or_a_checkpoint_is_refused_and_the_run_is_untouched(run_dir, tmp_path, where, link, force):
    before = snapshot(run_dir)
    out = TARGETS[where](run_dir)
    if link:
        (tmp_path / "elsewhere").mkdir()
        alias = tmp_path / "elsewhere" / "model"
        alias.symlink_to(out)
        out = alias
    result = export(run_dir, out, *(["--force"] if force else []))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "never writes into a run or a checkpoint" in text and "Traceback" not in text
    assert f"--out {run_dir.parent / 'run-export'}" in text  # where to write instead
    assert ("checkpoint" in where) == ("the checkpoint" in text)
    assert snapshot(run_dir) == before
    assert not (run_dir / "exports").exists() and not list(run_dir.parent.glob(".*incomplete*"))


def test_a_folder_holding_the_run_is_refused_even_with_force(run_dir):
    before = snapshot(run_dir)
    result = export(run_dir, run_dir.parent, "--force")
    assert result.exit_code == 2 and "holds the run folder" in " ".join(result.output.split())
    assert snapshot(run_dir) == before


def test_force_replaces_a_previous_export_and_only_that(run_dir, tmp_path):
    out = tmp_path / "model"
    assert export(run_dir, out).exit_code == 0
    (out / "stale.txt").write_text("from the first export\n")
    again = export(run_dir, out)
    text = " ".join(again.output.split())
    assert again.exit_code == 2 and "holds a previous export (run run, step 1); pass --force" in text
    via_link = tmp_path / "link"
    via_link.symlink_to(out)
    replaced = export(run_dir, via_link, "--force")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "spu_export.json").read_text())["step"] == 1 and not (out / "stale.txt").exists()
    assert via_link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "model", "run"]

    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me\n")
    refused = export(run_dir, mine, "--force")
    text = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "is not a previous export (no spu_export.json): it holds notes.txt, sub/" in text
    assert snapshot(mine) == {"notes.txt": b"keep me\n"}

    shutil.copytree(run_dir, out / "kept-run")  # a run moved into an export is never deleted with it
    held = export(run_dir, out, "--force")
    assert held.exit_code == 2 and "which an export never deletes" in " ".join(held.output.split())
    assert (out / "kept-run" / "events.jsonl").exists()


def test_an_export_that_fails_midway_leaves_no_out_and_keeps_a_previous_one(run_dir, tmp_path, monkeypatch):
    import spu_engine.tools.export.run as export_module

    def broken(*_args, **_kwargs):
        raise OSError("disk gone")

    out = tmp_path / "model"
    monkeypatch.setattr(export_module, "write_card", broken)
    with pytest.raises(OSError, match="disk gone"):
        export_run(run_dir, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.undo()
    export_run(run_dir, out)
    before = snapshot(out)
    monkeypatch.setattr(export_module, "write_card", broken)
    with pytest.raises(OSError, match="disk gone"):
        export_run(run_dir, out, force=True)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model", "run"]


KILLED = """
import os, signal, sys
from pathlib import Path
import spu_engine.tools.export.run as export_module

def die(folder, *_args, **_kwargs):
    (Path(folder) / "half-written").write_text("x")
    os.kill(os.getpid(), signal.SIGKILL)

export_module.write_card = die
export_module.export_run(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_an_export_killed_midway_leaves_a_marked_folder_and_a_re_export_needs_no_force(run_dir, tmp_path):
    out = tmp_path / "model"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED, str(run_dir), str(out)], env=env, timeout=300)
    assert killed.returncode == -9
    left = [p.name for p in tmp_path.iterdir() if p.name != "run"]
    assert not out.exists() and len(left) == 1 and left[0].startswith(".model.incomplete-")
    again = export(run_dir, out)
    assert again.exit_code == 0, again.output
    assert f"removed {left[0]}, left by an export that did not finish" in " ".join(again.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "run"] and (out / "spu_export.json").exists()


def test_the_policy_export_never_replaces_a_runs_or_a_checkpoints_file(make_engine, tmp_path):
    from spu_engine.core.protocol import ExportCmd

    engine = make_engine(run_dir=tmp_path / "run")
    engine.save_checkpoint()
    run = tmp_path / "run"
    acks: list[dict] = []
    engine.sinks.append(lambda _line, ev: acks.append(ev) if ev["type"] == "ack" else None)
    (tmp_path / "alias.yaml").symlink_to(run / "config.json")
    before = snapshot(run)
    for path in (run / "config.json", checkpoint_of(run) / "state.json", tmp_path / "alias.yaml"):
        engine.submit(ExportCmd(cmd="export", path=str(path), overwrite=True))
        engine.boundary()
        assert not acks[-1]["ok"] and "never" in acks[-1]["message"] and str(run) in acks[-1]["message"]
    assert {k: v for k, v in snapshot(run).items() if k != "events.jsonl"} == {
        k: v for k, v in before.items() if k != "events.jsonl"
    }
    engine.submit(ExportCmd(cmd="export", path=str(run / "policy-export.yaml")))  # the console's default: fine
    engine.boundary()
    assert acks[-1]["ok"] and (run / "policy-export.yaml").exists()
    engine.close()


async def test_the_consoles_export_screen_refuses_a_runs_own_file(run_dir):
    from textual.app import App

    from spu_tui.screens.export import ExportScreen

    chosen: list = []

    class Host(App):
        def on_mount(self) -> None:
            self.push_screen(ExportScreen(run_dir / "config.json"), chosen.append)

    app = Host()
    async with app.run_test(size=(100, 24)) as pilot:
        await pilot.press("enter")
        await pilot.pause(0.1)
        await pilot.press("enter")
        await pilot.pause(0.1)
        error = " ".join(str(app.screen.query_one("#export-error").render()).split())
        assert chosen == [] and "is the run's own config.json" in error and "policy-export.yaml" in error
