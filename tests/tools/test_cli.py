"""The headless CLI as a user runs it: `spu train`, `spu policy validate`, `spu policy schema`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from spu_engine.core.policy_files import load_policy
from spu_engine.model.loading import find_units, load_model
from support import SST2


def spu(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "spu_engine.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.process
def test_train_reports_trainable_count_and_writes_run_folder(tiny_model_dir, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "freeze:\n  - {units: [embeddings], trainable: false}\n  - {layers: '0-1', trainable: false}\n"
        "timeline:\n  - {step: 3, freeze: [{layers: [1], trainable: true}]}\n"
    )
    run = tmp_path / "run"
    r = spu(
        "train",
        "--model",
        tiny_model_dir,
        "--data",
        SST2,
        "--policy",
        policy,
        "--steps",
        6,
        "--batch-size",
        8,
        "--max-length",
        32,
        "--max-eval-samples",
        32,
        "--run-dir",
        run,
    )
    assert r.returncode == 0, r.stderr
    model = load_model(str(tiny_model_dir))
    units = find_units(model)
    outside = sum(u.numel for u in units if u.name not in ("embeddings", "block0", "block1"))
    assert f"trainable {outside:,} of" in r.stdout
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [(e["step"], e["source"]) for e in events if e["type"] == "policy"] == [(3, "timeline")]
    assert any(e["type"] == "eval" and 0.0 <= e["accuracy"] <= 1.0 for e in events)
    assert [e.step for e in load_policy(run / "policy.yaml").timeline] == [3]
    assert (run / "checkpoints" / "step-0000006" / "manifest.json").exists()


@pytest.mark.process
def test_train_takes_the_policy_run_settings_and_flags_override_them(tiny_model_dir, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        f"run:\n  model: {tiny_model_dir}\n  data: {SST2}\n  steps: 5\n  batch_size: 4\n  max_length: 24\n"
        "  max_train_samples: 32\n  max_eval_samples: 8\n  warmup: 0\n  seed: 7\n"
    )
    run = tmp_path / "run"
    r = spu("train", "--policy", policy, "--steps", 3, "--seed", 7, "--run-dir", run)
    assert r.returncode == 0, r.stderr
    assert f"note: command-line flags override the run settings of {policy}: --steps 5 -> 3" in r.stderr
    assert "--seed" not in r.stderr  # the same value as the file's is no override
    config = json.loads((run / "config.json").read_text())
    assert (config["steps"], config["batch_size"], config["max_length"], config["warmup"], config["seed"]) == (
        3,
        4,
        24,
        0,
        7,
    )
    assert config["model"] == str(tiny_model_dir) and config["max_train_samples"] == 32
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]
    assert load_policy(run / "policy.yaml").run.steps == 3  # the run's own policy says what it ran


@pytest.mark.process
def test_train_bad_inputs_are_one_line_errors(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("freeze:\n  - {layers: [12], trainable: false}\n")
    bad_run = tmp_path / "bad-run.yaml"
    bad_run.write_text("run:\n  steps: 0\n")
    cases = [
        (
            ("--model", tiny_model_dir, "--policy", bad_run),
            "run.steps: Input should be greater than or equal to 1 (got 0)",
        ),
        (("--model", tmp_path / "missing-model"), "model path"),
        (("--model", tiny_model_dir, "--policy", bad), "freeze[0].layers[0]: block index 12 is out of range"),
        (
            ("--model", tiny_model_dir, "--text-column", "review"),
            "no column 'review' (set by --text-column); columns are: sentence, label",
        ),
        (("--model", tiny_model_dir, "--steps", 0), "--steps: Input should be greater than or equal to 1"),
    ]
    for args, message in cases:
        r = spu("train", "--data", SST2, "--run-dir", tmp_path / "r", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert message in r.stderr, (message, r.stderr)
        assert "Traceback" not in r.stderr


@pytest.mark.process
def test_policy_validate_and_schema(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("freeze:\n  - {match: '*', trainable: false}\n")
    r = spu("policy", "validate", good)
    assert r.returncode == 0 and "ok" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("freeze:\n  - {match: '*', trainable: nope}\n")
    r = spu("policy", "validate", bad)
    assert r.returncode == 2 and "freeze[0].trainable: must be true or false" in r.stderr
    r = spu("policy", "validate", good, bad)  # each file said; refused when any is
    assert r.returncode == 2 and f"ok {good}:" in r.stdout and "freeze[0].trainable" in r.stderr
    schema = json.loads(spu("policy", "schema").stdout)
    assert schema["title"] == "SPU policy" and "freeze" in schema["properties"]


@pytest.mark.process
def test_every_example_policy_validates_against_a_bert_model(tiny_model_dir):
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[2] / "examples" / "policies").glob("*.yaml"))
    assert examples
    r = spu("policy", "validate", *examples, "--model", tiny_model_dir)  # the model loaded once for all of them
    assert r.returncode == 0, r.stderr
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("ok ")] == [
        f"{path}:" for path in examples
    ]


TRAIN = ("--data", SST2, "--batch-size", 8, "--max-length", 32, "--max-eval-samples", 16, "--eval-every", 0)


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by each test that changes it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    r = spu("train", "--model", tiny_model_dir, *TRAIN, "--steps", 4, "--checkpoint-every", 2, "--run-dir", run)
    assert r.returncode == 0, r.stderr
    return run


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _events(run):
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.process
def test_resume_without_optimizer_state_stops_naming_the_flag_and_keeps_every_checkpoint(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / "optimizer.pt").unlink()
    kept = _snapshot(run / "checkpoints")
    r = spu("train", "--resume", run)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert (
        "optimizer.pt is missing, but its weights verify" in r.stderr
        and f"spu train --resume {run} --fresh-optimizer" in r.stderr
    )
    assert _snapshot(run / "checkpoints") == kept and "Traceback" not in r.stderr
    assert not any(e["type"] in ("resumed", "step") and e["step"] == 0 for e in _events(run))  # no restart from step 0
    r = spu("train", "--resume", run, "--fresh-optimizer", "--steps", 6)
    assert r.returncode == 0, r.stderr
    events = _events(run)
    assert [e["step"] for e in events if e["type"] == "resumed"] == [4]
    assert [e["step"] for e in events if e["type"] == "step"][-2:] == [5, 6]
    assert any(e["type"] == "log" and "optimizer state not used" in e["message"] for e in events)


@pytest.mark.process
def test_resume_with_no_usable_checkpoint_is_an_error_and_keeps_them_aside(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    for checkpoint in (run / "checkpoints").iterdir():
        os.truncate(checkpoint / "model.safetensors", 100)
    r = spu("train", "--resume", run)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert (
        f"no usable checkpoint in {run / 'checkpoints'}: nothing to resume from" in r.stderr
        and "--overwrite" in r.stderr
    )
    aside = run / "checkpoints" / "unusable"
    assert sorted(p.name for p in aside.iterdir()) == ["step-0000002", "step-0000004"]
    assert all("(truncated)" in (p / "reason.txt").read_text() for p in aside.iterdir())
    assert os.path.getsize(aside / "step-0000004" / "model.safetensors") == 100
    assert not any(e["type"] == "step" and e["step"] == 1 for e in _events(run)[len(_events(trained_run)) :])


@pytest.mark.process
def test_a_folder_that_holds_a_run_is_refused_unless_overwrite(trained_run, tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from spu_engine.cli import app

    run = _copy(trained_run, tmp_path)
    before = _snapshot(run)
    refused = CliRunner().invoke(
        app, ["train", "--model", str(tiny_model_dir), *map(str, TRAIN), "--steps", "2", "--run-dir", str(run)]
    )
    assert refused.exit_code == 2
    assert f"--run-dir {run} already holds a run; continue it with `spu train --resume {run}`" in refused.output
    assert "--overwrite" in refused.output and _snapshot(run) == before
    r = spu("train", "--model", tiny_model_dir, *TRAIN, "--steps", 2, "--run-dir", run, "--overwrite")
    assert r.returncode == 0, r.stderr
    events = _events(run)
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2]  # one run's history, not two mixed
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]


@pytest.mark.process
def test_a_corrupt_policy_yaml_does_not_block_a_resume(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    (run / "policy.yaml").write_text("freeze: [{match: '*', trainable: false}\n")
    r = spu("train", "--resume", run, "--steps", 5)
    assert r.returncode == 0, r.stderr
    assert "malformed YAML" in r.stderr and "resuming with the policy stored in the checkpoint" in r.stderr
    assert (run / "policy.yaml.unreadable").read_text() == "freeze: [{match: '*', trainable: false}\n"
    load_policy(run / "policy.yaml")  # written anew from the checkpoint's policy
    said = [e["message"] for e in _events(run) if e["type"] == "log"]
    assert (
        "policy: the one stored in step-0000004 (state at step 0 and its timeline); policy.yaml was unreadable and is kept as policy.yaml.unreadable"
        in said
    )


@pytest.mark.process
def test_a_deleted_config_json_does_not_block_a_resume(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    settings = json.loads((run / "config.json").read_text())
    (run / "config.json").unlink()
    r = spu("train", "--resume", run, "--steps", 5)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert f"note: {run / 'config.json'} is missing; the run's settings are taken from step-0000004/state.json" in (
        r.stderr
    )
    assert [e["step"] for e in _events(run) if e["type"] == "resumed"] == [4]
    assert json.loads((run / "config.json").read_text()) == {**settings, "steps": 5}


@pytest.mark.process
def test_a_timeline_entry_the_model_cannot_take_fails_the_start_and_leaves_no_folder(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("timeline:\n  - {step: 3, set: {pruning: {method: magnitude, targets: ['*.atention.*']}}}\n")
    r = spu("train", "--model", tiny_model_dir, *TRAIN, "--steps", 4, "--policy", bad, "--run-dir", tmp_path / "run")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "timeline[0].set.pruning.targets[0]: pattern '*.atention.*' matches no parameter" in r.stderr
    assert not (tmp_path / "run").exists() and "Traceback" not in r.stderr
    schema = tmp_path / "schema.yaml"
    schema.write_text("timeline: [{step: 3, set: {pruning: {bogus_key: 1, method: nonsense}}}]\n")
    r = spu("policy", "validate", schema)
    assert (
        r.returncode == 2
        and "timeline[0].set.pruning.method: Input should be" in r.stderr
        and "unknown key 'bogus_key' in timeline[0].set.pruning" in r.stderr
    )


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_lr_must_be_a_finite_number(value, tmp_path):
    from typer.testing import CliRunner

    from spu_engine.cli import app

    r = CliRunner().invoke(app, ["train", "--data", str(SST2), "--lr", value, "--run-dir", str(tmp_path / "run")])
    assert r.exit_code == 2 and "--lr: Input should be a finite number" in r.output and not (tmp_path / "run").exists()


@pytest.mark.slow  # a real spu train (24 s); tests/core/test_shorthands.py checks the policies in the default set
@pytest.mark.process
def test_shorthand_flags_train_the_policy_their_yaml_would_and_the_run_exports_it(tiny_model_dir, tmp_path):
    from spu_engine.core.policy_files import policy_from_yaml

    run = tmp_path / "run"
    flags = ("--peft", "lora:r=4", "--prune", "magnitude:0.5", "--freeze", "embeddings")
    r = spu("train", "--model", tiny_model_dir, *TRAIN, "--steps", 2, "--run-dir", run, *flags)
    assert r.returncode == 0, r.stderr
    same = policy_from_yaml(
        "peft: {method: lora, r: 4}\npruning: {method: magnitude, schedule: {final_sparsity: 0.5}}\n"
        "freeze: [{units: [embeddings], trainable: false}]\n"
    )
    exported = load_policy(run / "policy.yaml")
    assert exported.sections() == same.sections()
