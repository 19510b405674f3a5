"""Trackers (``--report-to``): TensorBoard event files read back with TensorBoard's own reader, a missing package
refused before anything loads, and a tracker failing mid-run costing one warning, never the run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from spu_engine import cli
from spu_engine.core import trackers
from spu_engine.core.policy import Change, FreezeRule, Policy, TimelineEntry
from spu_engine.core.trackers import TensorBoard, scalars
from support import SST2


def read_events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_scalars_name_every_number_and_leave_texts_and_lists_out():
    step = {
        "type": "step",
        "t": 1.0,
        "step": 3,
        "loss": 0.5,
        "lr": 1e-3,
        "wus_phase": "full",
        "pruning": {"sparsity": 0.2, "layout": [1, 2]},
    }
    assert scalars(step) == {"train/loss": 0.5, "train/lr": 1e-3, "train/pruning/sparsity": 0.2}
    assert scalars({"type": "eval", "step": 3, "eval_loss": 0.7, "accuracy": 0.8}) == {
        "eval/loss": 0.7,
        "eval/accuracy": 0.8,
    }
    system = {"type": "system", "step": 3, "tokens_per_s": 100.0, "gpus": {"0": {"name": "H200", "utilization": 87.0}}}
    assert scalars(system) == {"system/tokens_per_s": 100.0, "system/gpu0/utilization": 87.0}
    units = {
        "type": "units",
        "step": 3,
        "units": {"block0": {"grad_norm": 0.1, "trainable": 1.0}},
        "tensors": {"x": {"sparsity": 0.0}},
    }
    assert scalars(units) == {"units/grad_norm/block0": 0.1, "units/trainable/block0": 1.0}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tensorboard_holds_the_loss_series_and_every_policy_change(make_engine, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    from spu_engine.core.protocol import ChangeCmd

    run_dir = tmp_path / "run"
    freeze = Change(freeze=[FreezeRule(units=["embeddings", "block0"], trainable=False)])
    policy = Policy(timeline=[TimelineEntry(step=3, **freeze.model_dump())])
    engine = make_engine(
        run_dir=run_dir,
        policy=policy,
        steps=6,
        eval_every=3,
        stats_every=2,
        system_every=0.001,
        report_to=["tensorboard"],
    )
    sb = Change(set={"selective_backprop": {"mode": "percentile", "keep": 0.5}})
    engine.submit(ChangeCmd(cmd="change", change=sb))  # a live command, taken at the first boundary
    engine.run()
    engine.close()
    events = read_events(run_dir)
    assert not [e for e in events if e["type"] == "log" and e["level"] == "warning" and "tracker" in e["message"]]
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    steps = [e for e in events if e["type"] == "step"]
    loss = acc.Scalars("train/loss")
    assert [s.step for s in loss] == [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    assert [s.value for s in loss] == pytest.approx([e["loss"] for e in steps], rel=1e-6)
    evals = [e for e in events if e["type"] == "eval"]
    assert [(s.step, s.value) for s in acc.Scalars("eval/accuracy")] == [
        (e["step"], pytest.approx(e["accuracy"])) for e in evals
    ]
    tags = acc.Tags()["scalars"]
    assert {
        "train/lr",
        "train/sb_kept_fraction",
        "units/grad_norm/block1",
        "system/tokens_per_s",
        "system/cpu_process",
    } <= set(tags)
    assert not any("gpu" in tag for tag in tags) or __import__("torch").cuda.is_available()
    texts = [
        (t.step, tensor_util.make_ndarray(t.tensor_proto).item().decode()) for t in acc.Tensors("policy/text_summary")
    ]
    assert [step for step, _ in texts] == [e["step"] for e in events if e["type"] == "policy"] == [0, 3]
    assert "source: client" in texts[0][1] and "selective_backprop" in texts[0][1] and "keep: 0.5" in texts[0][1]
    assert "source: timeline" in texts[1][1] and "- embeddings" in texts[1][1] and "trainable: false" in texts[1][1]
    assert "report_to" in tensor_util.make_ndarray(acc.Tensors("config/text_summary")[0].tensor_proto).item().decode()


def test_a_missing_tracker_package_is_one_line_and_exit_2_before_anything_loads(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "installed", lambda module: module != "tensorboard")
    runner = CliRunner()
    run_dir = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(SST2), "--steps", "2", "--run-dir", str(run_dir)]
    result = runner.invoke(cli.app, [*args, "--report-to", "tensorboard"])
    assert result.exit_code == 2
    assert "--report-to tensorboard needs the tensorboard package: pip install tensorboard" in result.output
    assert "Traceback" not in result.output and not run_dir.exists()
    result = runner.invoke(cli.app, [*args, "--report-to", "tensorbord"])
    assert result.exit_code == 2
    assert (
        "--report-to: unknown tracker 'tensorbord'; trackers are tensorboard, wandb, mlflow, trackio (or none)"
        in result.output
    )


def test_a_missing_package_stops_an_engine_started_without_the_cli_before_it_trains(make_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "installed", lambda module: False)
    with pytest.raises(ValueError, match="--report-to wandb needs the wandb package: pip install wandb"):
        make_engine(run_dir=tmp_path / "run", report_to=["wandb"])


def test_a_tracker_that_raises_mid_run_is_switched_off_with_one_warning_and_training_completes(
    make_engine, tmp_path, monkeypatch
):
    calls: list[int] = []
    original = TensorBoard.scalars

    def disk_full(self, step, values):
        calls.append(step)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        original(self, step, values)

    monkeypatch.setattr(TensorBoard, "scalars", disk_full)
    run_dir = tmp_path / "run"
    engine = make_engine(run_dir=run_dir, steps=8, report_to=["tensorboard"])
    assert engine.run() == "finished"
    engine.close()
    events = read_events(run_dir)
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, 9))
    warnings = [
        e["message"]
        for e in events
        if e["type"] == "log" and e["level"] == "warning" and "collapsed" not in e["message"]
    ]
    assert warnings == [
        "tracker tensorboard failed (OSError: [Errno 28] No space left on device); it is switched off, training goes on"
    ]
    assert len(calls) == 3  # nothing more was sent to it


@pytest.mark.process
@pytest.mark.slow
def test_under_torchrun_only_rank_0_reports(tiny_model_dir, tmp_path):
    """Two ranks (gloo on CPU): one TensorBoard writer, one series of steps, and the system event's throughput counts
    both ranks' shares of the global batch."""
    import os
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not installed")
    run_dir = tmp_path / "run"
    config = tmp_path / "p.yaml"
    config.write_text("run:\n  report_to: [tensorboard]\n")
    args = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_port",
        "29541",
        "-m",
        "spu_engine.cli",
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(SST2),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--max-length",
        "32",
        "--max-eval-samples",
        "16",
        "--policy",
        str(config),
        "--run-dir",
        str(run_dir),
    ]
    r = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # one writer: rank 0's
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [s.step for s in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    system = [e for e in read_events(run_dir) if e["type"] == "system"]
    assert sum(e["samples_per_s"] * e["seconds"] for e in system) == pytest.approx(4 * 4 * 2, rel=0.02)


def feed(names: list[str], run_dir, events: list[dict]) -> list[str]:
    """``events`` through a ``Trackers`` sink as the engine emits them; the warnings it had."""
    from spu_engine.core.protocol import encode

    sink = trackers.Trackers(names, run_dir)
    for ev in events:
        sink(encode(ev), ev)
    return sink.close()


RUN = [
    {
        "type": "hello",
        "t": 1.0,
        "step": 0,
        "run": "r1",
        "config": {"model": "tiny", "steps": 2, "report_to": ["wandb"]},
    },
    {"type": "step", "t": 1.1, "step": 1, "loss": 0.7, "lr": 0.001},
    {
        "type": "policy",
        "t": 1.2,
        "step": 1,
        "source": "client",
        "change": {"freeze": [{"units": ["block0"], "trainable": False}]},
        "trainable": 10,
    },
    {"type": "eval", "t": 1.3, "step": 2, "eval_loss": 0.6, "accuracy": 0.75},
]


def test_wandb_trackio_and_mlflow_get_scalars_and_texts_through_their_own_calls(tmp_path, monkeypatch):
    """Stand-ins for the packages (not installed here) record what each backend calls, as their docs spell it."""
    import sys
    import types

    calls: list[tuple] = []

    def wandb_like(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        module.init = lambda **kw: calls.append((name, "init", kw["name"], kw["config"]["model"]))
        module.log = lambda values, step: calls.append((name, "log", step, sorted(values)))
        module.Table = lambda columns, data: ("table", columns, [row[0] for row in data])
        module.finish = lambda: calls.append((name, "finish"))
        return module

    mlflow = types.ModuleType("mlflow")
    mlflow.start_run = lambda run_name: calls.append(("mlflow", "start", run_name))
    mlflow.log_params = lambda params: calls.append(("mlflow", "params", params["model"]))
    mlflow.log_metrics = lambda values, step: calls.append(("mlflow", "log", step, sorted(values)))
    mlflow.log_text = lambda text, path: calls.append(("mlflow", "text", path, "block0" in text))
    mlflow.end_run = lambda: calls.append(("mlflow", "end"))
    for name, module in (("wandb", wandb_like("wandb")), ("trackio", wandb_like("trackio")), ("mlflow", mlflow)):
        monkeypatch.setitem(sys.modules, name, module)
    assert feed(["wandb", "trackio", "mlflow"], tmp_path, RUN) == []
    for name in ("wandb", "trackio"):
        assert [c[1:] for c in calls if c[0] == name] == [
            ("init", "r1", "tiny"),
            ("log", 1, ["train/loss", "train/lr"]),
            ("log", 1, ["policy"]),
            ("log", 2, ["eval/accuracy", "eval/loss"]),
            ("finish",),
        ]
    assert [c[1:] for c in calls if c[0] == "mlflow"] == [
        ("start", "r1"),
        ("params", "tiny"),
        ("log", 1, ["train/loss", "train/lr"]),
        ("text", "policy/step-0000001.yaml", True),
        ("log", 2, ["eval/accuracy", "eval/loss"]),
        ("end",),
    ]


def test_a_tracker_that_cannot_start_is_one_warning_and_the_others_go_on(tmp_path, monkeypatch):
    def no_login(self, run_dir, run, config, step):
        raise RuntimeError("wandb: not logged in")

    monkeypatch.setattr(TensorBoard, "__init__", no_login)
    warnings = feed(["tensorboard"], tmp_path, RUN)
    assert warnings == [
        "tracker tensorboard could not start (RuntimeError: wandb: not logged in); training goes on without it"
    ]


def test_an_unwritable_tensorboard_folder_is_one_line_and_no_thread_traceback(tmp_path, monkeypatch):
    import threading

    from tensorboard.summary.writer.record_writer import RecordWriter

    def unwritable(self, data):
        raise PermissionError(13, "Permission denied", str(tmp_path / "tensorboard"))

    uncaught: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: uncaught.append(args.thread.name))
    monkeypatch.setattr(RecordWriter, "write", unwritable)
    warnings = feed(["tensorboard"], tmp_path, RUN)
    assert uncaught == []  # TensorBoard's writer thread re-raised it: 40 lines of traceback at exit
    assert len(warnings) == 1 and warnings[0].startswith("tracker tensorboard ") and "Permission denied" in warnings[0]
    assert "\n" not in warnings[0]
