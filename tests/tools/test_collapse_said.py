"""A model that answers one class for everything is said so wherever its classification metrics are shown."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.collapse import collapse_note
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from support import SST2

SAID = "collapsed: every answer is class 1; the metrics reflect the majority class, not learning"


def flat(text: str) -> str:
    """Output as one line: rich wraps long lines at the test console's width."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def collapsed_dir(tiny_model_dir, tmp_path_factory):
    """The tiny BERT with a head that answers class 1 whatever it reads."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([-5.0, 5.0]))
    model.config.id2label, model.config.label2id = {0: "0", 1: "1"}, {"0": 0, "1": 1}
    folder = tmp_path_factory.mktemp("collapsed")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def collapsed_run(collapsed_dir, tmp_path_factory):
    """A Houlsby-adapter run from the collapsed model at a learning rate too small to leave it: evaluated twice."""
    config = EngineConfig(
        model=str(collapsed_dir),
        data=str(SST2),
        task="classification",
        steps=4,
        batch_size=4,
        max_length=32,
        max_train_samples=64,
        max_eval_samples=24,
        eval_every=2,
        warmup=0,
        lr=1e-6,
    )
    run_dir = tmp_path_factory.mktemp("collapsed-run") / "run"
    engine = Engine(config, parse_policy({"peft": {"method": "adapter", "size": 8}}), run_dir)
    assert engine.run() == "finished"
    engine.close()
    return run_dir


def test_one_definition_reads_the_engines_fields_and_the_flattened_ones():
    raw = {"accuracy": 0.68, "top_answer_share": 1.0, "top_answer": "1", "eval_samples": 40}
    assert collapse_note(raw) == SAID
    assert collapse_note({"eval.top_answer_share": 0.995, "eval.samples": 200}) == (
        "collapsed: 99.5% of the answers are one class; the metrics reflect the majority class, not learning"
    )
    assert collapse_note({**raw, "top_answer_share": 0.9}) is None  # answers by its input
    assert collapse_note({**raw, "eval_samples": 10}) is None  # too few examples to tell
    assert collapse_note({"f1": 80.0, "exact_match": 70.0}) is None  # QA: no classes


def test_spu_eval_says_a_collapsed_model_beside_its_metrics(collapsed_dir):
    args = ["eval", "--model", str(collapsed_dir), "--data", str(SST2), "--max-samples", "40", "--device", "cpu"]
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "top_answer_share" in table.stdout and SAID in flat(table.stdout)
    got = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)
    assert got["collapsed"] == SAID and got["metrics"]["top_answer"] == "1"


def test_spu_ablate_says_the_drops_of_a_collapsed_model_mean_nothing(collapsed_run):
    table = CliRunner().invoke(app, ["ablate", "--run", str(collapsed_run), "--singles"])
    assert table.exit_code == 0, table.output
    assert f"with every adapter, {SAID}: a drop near 0 then says nothing about the adapters" in flat(table.stdout)
    assert "collapsed to one class" in table.stdout  # each span's row
    report = json.loads(CliRunner().invoke(app, ["ablate", "--run", str(collapsed_run), "--singles", "--json"]).stdout)
    assert report["collapsed"] == SAID and all(s["collapsed"] == SAID for s in report["spans"])


def test_spu_report_says_the_final_answers_collapsed_and_ranks_no_top_answer_share(collapsed_run):
    for args in ([], ["--format", "md"], ["--format", "csv"]):
        result = CliRunner().invoke(app, ["report", "--run", str(collapsed_run), *args])
        assert result.exit_code == 0, result.output
        assert "final answers" in result.stdout and SAID in flat(result.stdout), args
        assert "final eval.top_answer_share" in result.stdout and "best eval.top_answer_share" not in result.stdout


async def test_the_console_says_it_in_the_log_the_loss_legend_and_the_ablation_screen(collapsed_run):
    from spu_engine.core.runs import read_history
    from spu_tui.app import SpuApp
    from spu_tui.screens.ablation import AblationScreen
    from spu_tui.widgets.run_charts import LossChart

    report = json.loads(CliRunner().invoke(app, ["ablate", "--run", str(collapsed_run), "--singles", "--json"]).stdout)
    console = SpuApp(collapsed_run, history=read_history(collapsed_run), connect=False)
    async with console.run_test(size=(120, 36)) as pilot:
        await pilot.pause(0.5)
        said = [line for line in console.state.log if line.kind == "eval" and line.text == SAID]
        assert [line.step for line in said] == [2, 4] and all(line.error for line in said)
        assert console.state.collapsed == SAID
        assert str(console.query_one(LossChart).border_subtitle).startswith(
            "[bold red]collapsed to one class[/bold red] "
        )
        console.push_screen(AblationScreen(report, 4))
        await pilot.pause(0.3)
        shown = " ".join(str(s.render()) for s in console.screen.query("Static"))
        assert f"with every adapter, {SAID}" in flat(shown)


def test_spu_runs_and_the_run_browser_mark_a_collapsed_run(collapsed_run):
    from spu_engine.core.runs import run_info
    from spu_tui.screens.runs import RunRow

    result = CliRunner().invoke(app, ["runs", str(collapsed_run.parent)])
    assert result.exit_code == 0, result.output
    table = result.stdout.split("\n", 1)[1]  # past the title, which names the folder collapsed-run...
    assert "run" in table and "accuracy" in table and " collapsed" in table
    info = run_info(collapsed_run)
    assert info.collapsed and str(RunRow(info, "adapters 8").cells(False, False)[3]).split("\n")[0].endswith(
        " collapsed"
    )


def test_spu_train_says_it_under_each_collapsed_evaluation(collapsed_dir, tmp_path):
    args = ["train", "--model", str(collapsed_dir), "--data", str(SST2), "--task", "classification", "--steps", "2"]
    args += ["--eval-every", "1", "--max-eval-samples", "24", "--max-train-samples", "32", "--batch-size", "4"]
    args += ["--lr", "1e-9", "--device", "cpu", "--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert flat(result.output).count(SAID) == 2  # under the evaluations of steps 1 and 2
