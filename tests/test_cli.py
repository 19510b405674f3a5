"""The headless CLI as a user runs it: `spu train`, `spu policy validate`, `spu policy schema`."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import SST2
from spu_engine.model import find_units, load_model
from spu_engine.policy import load_policy


def spu(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "spu_engine.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_train_reports_trainable_count_and_writes_run_folder(tiny_model_dir, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("freeze:\n  - {units: [embeddings], trainable: false}\n  - {layers: '0-1', trainable: false}\n"
                      "timeline:\n  - {step: 3, freeze: [{layers: [1], trainable: true}]}\n")
    run = tmp_path / "run"
    r = spu("train", "--model", tiny_model_dir, "--data", SST2, "--policy", policy, "--steps", 6, "--batch-size", 8,
            "--max-length", 32, "--max-eval-samples", 32, "--run-dir", run)
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


def test_train_takes_the_policy_run_settings_and_flags_override_them(tiny_model_dir, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(f"run:\n  model: {tiny_model_dir}\n  data: {SST2}\n  steps: 5\n  batch_size: 4\n  max_length: 24\n"
                      "  max_train_samples: 32\n  max_eval_samples: 8\n  warmup: 0\n  seed: 7\n")
    run = tmp_path / "run"
    r = spu("train", "--policy", policy, "--steps", 3, "--seed", 7, "--run-dir", run)
    assert r.returncode == 0, r.stderr
    assert f"note: command-line flags override the run settings of {policy}: --steps 5 -> 3" in r.stderr
    assert "--seed" not in r.stderr  # the same value as the file's is no override
    config = json.loads((run / "config.json").read_text())
    assert (config["steps"], config["batch_size"], config["max_length"], config["warmup"], config["seed"]) == (3, 4, 24, 0, 7)
    assert config["model"] == str(tiny_model_dir) and config["max_train_samples"] == 32
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]
    assert load_policy(run / "policy.yaml").run.steps == 3  # the run's own policy says what it ran


def test_train_bad_inputs_are_one_line_errors(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("freeze:\n  - {layers: [12], trainable: false}\n")
    bad_run = tmp_path / "bad-run.yaml"
    bad_run.write_text("run:\n  steps: 0\n")
    cases = [
        (("--model", tiny_model_dir, "--policy", bad_run), "run.steps: Input should be greater than or equal to 1 (got 0)"),
        (("--model", tmp_path / "missing-model"), "model path"),
        (("--model", tiny_model_dir, "--policy", bad), "freeze[0].layers[0]: block index 12 is out of range"),
        (("--model", tiny_model_dir, "--text-column", "review"), "no column 'review' (set by --text-column); columns are: sentence, label"),
        (("--model", tiny_model_dir, "--steps", 0), "--steps: Input should be greater than or equal to 1"),
    ]
    for args, message in cases:
        r = spu("train", "--data", SST2, "--run-dir", tmp_path / "r", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert message in r.stderr, (message, r.stderr)
        assert "Traceback" not in r.stderr


def test_policy_validate_and_schema(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("freeze:\n  - {match: '*', trainable: false}\n")
    r = spu("policy", "validate", good)
    assert r.returncode == 0 and "ok" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("freeze:\n  - {match: '*', trainable: nope}\n")
    r = spu("policy", "validate", bad)
    assert r.returncode == 2 and "freeze[0].trainable: Input should be a valid boolean" in r.stderr
    schema = json.loads(spu("policy", "schema").stdout)
    assert schema["title"] == "SPU policy" and "freeze" in schema["properties"]


def test_every_example_policy_validates_against_a_bert_model(tiny_model_dir):
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[1] / "examples" / "policies").glob("*.yaml"))
    assert examples
    for path in examples:
        r = spu("policy", "validate", path, "--model", tiny_model_dir)
        assert r.returncode == 0 and "ok" in r.stdout, (path.name, r.stderr)
