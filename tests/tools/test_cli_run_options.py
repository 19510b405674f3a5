"""`spu train` and `spu-tui` take the same run options, made from the settings' fields (spu_engine/core/run_options.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer
import typer.main
from pydantic import Field
from typer.testing import CliRunner

from spu_engine.cli import app as spu
from spu_engine.core import config
from spu_engine.core.run_options import PANEL, run_flags, run_options
from spu_tui.cli import app as console
from support import SST2

ROOT = Path(__file__).resolve().parents[2]

# Every flag each command had before the run options were made from the settings: each must keep working.
TRAIN_FLAGS_BEFORE = [
    "--model",
    "--data",
    "--policy",
    "--steps",
    "--run-dir",
    "--resume",
    "--overwrite",
    "--fresh-optimizer",
    "--task",
    "--batch-size",
    "--max-length",
    "--lr",
    "--eval-every",
    "--checkpoint-every",
    "--max-eval-samples",
    "--text-column",
    "--label-column",
    "--metric",
    "--doc-stride",
    "--eval-split",
    "--seed",
    "--device",
    "--report-to",
]
TUI_FLAGS_BEFORE = [
    "--model",
    "--data",
    "--policy",
    "--run-dir",
    "--task",
    "--steps",
    "--batch-size",
    "--max-length",
    "--lr",
    "--eval-every",
    "--stats-every",
    "--checkpoint-every",
    "--max-train-samples",
    "--max-eval-samples",
    "--text-column",
    "--label-column",
    "--metric",
    "--seed",
    "--device",
    "--threads",
    "--report-to",
    "--ui-cpu",
    "--compare",
]


def help_panel(app: typer.Typer, *args: str, panel: str = PANEL) -> list[str]:
    """The options a --help output lists in one panel, in order."""
    output = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "160"}).output
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if f"─ {panel} ─" in line)
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("╰"))
    return [m.group(1) for line in lines[start:end] if (m := re.match(r"│ (--[a-z0-9-]+)", line))]


def click_params(app: typer.Typer, *path: str) -> dict:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {p.name: p for p in command.params}


def described(param) -> tuple:
    return param.opts, param.secondary_opts, param.help, param.type_descriptor.annotation, param.default


def test_spu_train_and_spu_tui_list_the_same_run_options():
    flags = [f.flag for f in run_flags()]
    assert help_panel(spu, "train") == help_panel(console) == flags
    assert len(flags) == len(config.EngineConfig.model_fields)  # every setting, and where the run happens
    train, tui = click_params(spu, "train"), click_params(console)
    for field in config.EngineConfig.model_fields:
        assert described(train[field]) == described(tui[field]), field
        assert train[field].default is None  # not given: the policy's run: settings (or the field's default) decide
    own = {"train": help_panel(spu, "train", panel="Options"), "tui": help_panel(console, panel="Options")}
    assert not {flag for opts in own.values() for flag in opts} & set(flags), own


def test_the_help_of_a_run_option_is_the_setting_s_description_and_default():
    train = click_params(spu, "train")
    assert train["steps"].help == "optimizer steps; the LR schedule is laid over them (default: 1000)"
    assert train["stats_every"].help == "per-unit statistics every N steps (default: 10)"
    assert train["doc_stride"].help == config.RunSettings.model_fields["doc_stride"].description  # None: not said
    types = [train[name].type_descriptor.annotation for name in ("lr", "max_length", "model", "report_to")]
    assert types == [float, int, str, str]  # a list is given as 'a,b'


def test_every_flag_either_command_had_still_works():
    train = {opt for p in click_params(spu, "train").values() for opt in p.opts}
    tui = {opt for p in click_params(console).values() for opt in p.opts}
    assert set(TRAIN_FLAGS_BEFORE) <= train and set(TUI_FLAGS_BEFORE) <= tui
    own = {"--policy", "--run-dir", "--resume", "--overwrite", "--fresh-optimizer", "--ui-cpu", "--compare"}
    shared = (set(TRAIN_FLAGS_BEFORE) | set(TUI_FLAGS_BEFORE)) - own
    assert shared <= {f.flag for f in run_flags()}
    assert shared <= train and shared <= tui


def test_a_command_receives_the_flags_given_as_settings():
    received = []
    app = typer.Typer()

    @app.command()
    @run_options
    def start(flags: dict, name: str = typer.Option("x")) -> None:
        received.append((name, flags))

    runner = CliRunner()
    assert runner.invoke(app, ["--steps", "3", "--report-to", "tensorboard, wandb", "--name", "y"]).exit_code == 0
    assert runner.invoke(app, ["--report-to", ""]).exit_code == 0
    assert runner.invoke(app, []).exit_code == 0
    assert received == [
        ("y", {"steps": 3, "report_to": ["tensorboard", "wandb"]}),
        ("x", {"report_to": ["none"]}),
        ("x", {}),
    ]


def test_a_setting_without_a_command_line_form_or_a_command_option_named_like_one_is_an_error(monkeypatch):
    class Mapped(config.EngineConfig):
        weights: dict[str, float] = Field(default_factory=dict)

    monkeypatch.setattr(config, "EngineConfig", Mapped)
    with pytest.raises(TypeError, match="setting 'weights'"):
        run_flags()
    monkeypatch.undo()

    def clashing(flags: dict, steps: int = 1) -> None: ...

    with pytest.raises(TypeError, match="steps are run settings"):
        run_options(clashing)


@pytest.mark.process
def test_a_setting_added_to_the_settings_is_a_flag_of_both_commands(tmp_path):
    """A new field in spu_engine/core/config.py, nothing else: both commands list it, and what it is given reaches the
    settings (checked by a value the field refuses, so nothing loads)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    script = textwrap.dedent(
        f"""
        import json
        from pydantic import Field
        from spu_engine.core import config

        class Wider(config.EngineConfig):
            new_knob: int = Field(7, ge=1, description="a setting added by the test")

        config.EngineConfig = Wider
        import typer.main
        from typer.testing import CliRunner
        from spu_engine.cli import app
        from spu_tui.cli import app as console

        train, tui = typer.main.get_command(app).commands["train"], typer.main.get_command(console)
        given = ["--data", {str(SST2)!r}, "--task", "classification", "--new-knob", "0"]
        given += ["--run-dir", {str(tmp_path / "run")!r}]
        runner = CliRunner()
        print(json.dumps({{
            "params": [[(p.opts, p.help) for p in c.params if p.name == "new_knob"] for c in (train, tui)],
            "help": [runner.invoke(app, ["train", "--help"]).output, runner.invoke(console, ["--help"]).output],
            "train": [(r := runner.invoke(app, ["train", *given])).exit_code, r.output],
            "tui": [(r := runner.invoke(console, ["--model", {str(model)!r}, *given])).exit_code, r.output],
        }}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "160"}
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["params"] == [[[["--new-knob"], "a setting added by the test (default: 7)"]]] * 2
    assert all("--new-knob" in text for text in found["help"])
    for command in ("train", "tui"):
        code, output = found[command]
        refused = "--new-knob: Input should be greater than or equal to 1 (got 0)"
        assert code == 2 and refused in output, (command, output)
    assert not (tmp_path / "run").exists()


def test_spu_train_takes_the_run_flags_spu_tui_had(monkeypatch, tmp_path):
    import spu_engine.core.spawn
    import spu_engine.loop.serve

    started = []
    monkeypatch.setattr(spu_engine.loop.serve, "serve", lambda config, *a, **k: started.append(config) or 0)
    args = ["train", "--data", str(SST2), "--task", "classification", "--run-dir", str(tmp_path / "run")]
    flags = ["--max-train-samples", "16", "--stats-every", "2", "--threads", "1", "--keep-checkpoints", "5"]
    result = CliRunner().invoke(spu, [*args, *flags])
    assert result.exit_code == 0, result.output
    config_ = started[0]
    assert (config_.max_train_samples, config_.stats_every, config_.threads, config_.keep_checkpoints) == (16, 2, 1, 5)


def test_a_resume_takes_where_and_how_long_and_says_which_flags_it_ignores(monkeypatch, tmp_path):
    import spu_engine.loop.serve

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": str(SST2), "task": "classification", "steps": 4, "lr": 0.01}))
    (run / "checkpoints" / "step-0000002").mkdir(parents=True)  # a run that trained: something to resume
    started = []
    monkeypatch.setattr(spu_engine.loop.serve, "serve", lambda config, *a, **k: started.append(config) or 0)
    flags = ["--steps", "9", "--threads", "1", "--lr", "0.5", "--max-train-samples", "3"]
    result = CliRunner().invoke(spu, ["train", "--resume", str(run), *flags])
    assert result.exit_code == 0, result.output
    assert (started[0].steps, started[0].threads, started[0].lr, started[0].max_train_samples) == (9, 1, 0.01, None)
    assert "note: a resumed run keeps its own settings; ignored: --lr, --max-train-samples" in result.output


def test_spu_tui_takes_the_run_flags_spu_train_had(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import spu_engine.core.spawn
    import spu_tui.app

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    started = {}

    def spawn(config, policy, run_dir):
        started.update(config=config)
        return SimpleNamespace(poll=lambda: None)

    monkeypatch.setattr(spu_engine.core.spawn, "spawn_engine", spawn)
    monkeypatch.setattr(spu_tui.app.SpuApp, "run", lambda self: None)
    args = ["--model", str(model), "--data", str(SST2), "--task", "qa", "--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(console, [*args, "--doc-stride", "16", "--eval-split", "0.2", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    config_ = started["config"]
    assert (config_.doc_stride, config_.eval_split, config_.precision, config_.model) == (16, 0.2, "fp32", str(model))
