"""SFT from the command line: `spu train` infers the task and shows loss, perplexity and generations; an export of
the run is scored by `spu eval` as SFT; `spu report` shows the run's metrics."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from spu_engine.cli import app


def test_train_export_eval_and_report_an_sft_run(llama_dir, gsm8k_like, tmp_path):
    run, export = tmp_path / "run", tmp_path / "export"
    train = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            str(llama_dir),
            "--data",
            str(gsm8k_like),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--max-length",
            "64",
            "--generate-eval",
            "2",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
            "--run-dir",
            str(run),
        ],
    )
    assert train.exit_code == 0, train.output
    assert "task: sft" in train.output
    assert (
        "eval step 2: eval_loss " in train.output and "perplexity " in train.output and "exact_match " in train.output
    )
    assert "generation 1 of 2: " in train.output and "expected 8]" in train.output  # the first dev answer is #### 8

    exported = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(export)])
    assert exported.exit_code == 0, exported.output
    scored = CliRunner().invoke(
        app, ["eval", "--model", str(export), "--data", str(gsm8k_like), "--device", "cpu", "--json"]
    )
    assert scored.exit_code == 0, scored.output
    result = json.loads(scored.stdout.strip().splitlines()[-1])
    assert result["task"] == "sft" and result["checkpoint"] is None and result["metric"] == "perplexity"
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    last = [e for e in events if e["type"] == "eval"][-1]
    assert abs(result["metrics"]["perplexity"] - last["perplexity"]) < 1e-3 * last["perplexity"]

    report = CliRunner().invoke(app, ["report", "--run", str(run), "--format", "md"])
    assert report.exit_code == 0, report.output
    assert "| task | sft |" in report.output and "| final eval.perplexity |" in report.output
    assert "| final eval.exact_match |" in report.output
