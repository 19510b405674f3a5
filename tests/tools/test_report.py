"""IMP rounds: the engine evaluates at each round's end and reports it; ``spu report`` prints the rounds."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.policy_files import parse_policy
from spu_engine.core.runs import read_history
from spu_engine.loop.engine import Engine, EngineConfig
from support import WIKI

IMP = {"pruning": {"method": "imp", "imp": {"rounds": 2, "round_steps": 3, "fraction": 0.5}}}


@pytest.fixture(scope="module")
def imp_run(tiny_gpt2_dir, tmp_path_factory):
    """A tiny GPT-2 trained on a slice of WikiText-2 with two IMP rounds of 3 steps (rounds 0, 1, 2 end at 3, 6, 9)."""
    config = EngineConfig(
        model=str(tiny_gpt2_dir),
        data=str(WIKI),
        task="lm",
        steps=9,
        batch_size=4,
        max_length=32,
        max_train_samples=48,
        max_eval_samples=8,
        eval_every=0,
        warmup=0,
        lr=1e-3,
    )
    run_dir = tmp_path_factory.mktemp("imp") / "run"
    engine = Engine(config, parse_policy(IMP), run_dir)
    assert engine.run() == "finished"
    targets = list(next(m for m in engine.methods if m.section == "pruning").targets)
    engine.close()
    return run_dir, targets


def test_each_round_is_evaluated_at_its_end_and_reported(imp_run):
    run_dir, targets = imp_run
    history = read_history(run_dir)
    rounds = [e for e in history if e["type"] == "imp_round"]
    evals = {e["step"]: e for e in history if e["type"] == "eval"}
    steps = [e for e in history if e["type"] == "step"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and [r["step"] for r in rounds] == [3, 6, 9]
    assert sorted(evals) == [
        3,
        6,
        9,
    ]  # eval_every 0: the round ends are the only evaluations (the last is the run's own)
    for r, sparsity in zip(rounds, [0.0, 0.5, 0.75]):
        assert r["rounds"] == 2 and r["steps"] == 3 and r["start_step"] == r["step"] - 3
        assert r["sparsity"] == pytest.approx(sparsity, abs=1e-3)
        assert set(r["kept_by_tensor"]) == set(targets) and set(r["kept_by_unit"]) == {
            "block0",
            "block1",
            "block2",
            "block3",
        }
        assert sum(r["kept_by_unit"].values()) / 4 == pytest.approx(1 - sparsity, abs=0.02)
        own = [s["loss"] for s in steps if r["start_step"] < s["step"] <= r["step"]]
        assert r["train_loss"] == pytest.approx(sum(own) / len(own), rel=1e-5)
        assert r["eval"]["eval_loss"] == evals[r["step"]]["eval_loss"]
        assert r["eval"]["perplexity"] == pytest.approx(math.exp(r["eval"]["eval_loss"]))
        assert r["seconds"] >= r["train_seconds"] > 0


def test_report_prints_the_round_table_and_plots(imp_run):
    result = CliRunner().invoke(app, ["report", "--run", str(imp_run[0])])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "final eval.perplexity" in out and "sparsity of the pruning targets" in out  # the summary comes first
    assert f"IMP rounds of {imp_run[0]}" in out and "kept share of each unit" in out
    assert "75.0%" in out and "50.0%" in out and "sparsity of each unit, by round" in out
    assert "perplexity at each round's end vs sparsity" in out and "round time (s) vs sparsity" in out


def test_report_as_markdown_and_csv(imp_run):
    runner = CliRunner()
    md = runner.invoke(app, ["report", "--run", str(imp_run[0]), "--format", "md"])
    assert md.exit_code == 0, md.output
    lines = md.output.strip().splitlines()
    assert lines[0] == "## run" and "| sparsity of the pruning targets | 75.0% |" in lines
    lines = lines[lines.index("### IMP rounds") + 2 :]
    assert lines[0].startswith("| round | from | to | sparsity | train loss | eval loss | perplexity |")
    assert lines[1].startswith("|---:|") and len(lines) == 2 + 3 and lines[4].startswith("| 2 | 6 | 9 | 75.0% |")
    table = runner.invoke(app, ["report", "--run", str(imp_run[0]), "--format", "csv", "--table", "rounds"])
    assert table.exit_code == 0, table.output
    rows = list(csv.DictReader(io.StringIO(table.output)))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert [float(r["sparsity"]) for r in rows] == pytest.approx([0.0, 0.5, 0.75], abs=1e-3)
    assert float(rows[2]["kept block0"]) < float(rows[1]["kept block0"]) < float(rows[0]["kept block0"]) == 1.0
    bad = runner.invoke(app, ["report", "--run", str(imp_run[0]), "--format", "xlsx"])
    assert bad.exit_code == 2 and "--format: 'xlsx' is not one of table, md, csv" in bad.output


def test_report_refuses_bad_input_with_a_message(imp_run, tmp_path):
    runner = CliRunner()

    def report(path):
        result = runner.invoke(app, ["report", "--run", str(path), "--format", "csv", "--table", "rounds"])
        assert "Traceback" not in result.output
        return result

    missing = report(tmp_path / "nope")
    assert missing.exit_code == 2 and "no such run folder" in missing.output
    (tmp_path / "empty").mkdir()
    empty = report(tmp_path / "empty")
    assert empty.exit_code == 2 and "is not a run folder (no events.jsonl)" in empty.output
    plain = tmp_path / "plain"
    plain.mkdir()
    hello = {"type": "hello", "step": 0, "metric": "accuracy", "current": {"pruning": {"method": "magnitude"}}}
    (plain / "events.jsonl").write_text(
        json.dumps(hello) + "\n" + json.dumps({"type": "step", "step": 1, "loss": 0.5}) + "\n"
    )
    none = report(plain)
    assert none.exit_code == 2 and "no IMP rounds to report; this run never set pruning.method: imp" in none.output
    hello["current"]["pruning"]["method"] = "imp"
    (plain / "events.jsonl").write_text(json.dumps(hello) + "\n")
    early = report(plain)
    assert early.exit_code == 2 and "IMP is on but no round has been reported yet" in early.output
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    lines = (imp_run[0] / "events.jsonl").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if '"imp_round"' in line)
    shape = json.loads(lines[first])
    shape["round"] = "zero"
    lines[first] = json.dumps(shape)
    lines.insert(2, '{"type": "step", "st')
    (damaged / "events.jsonl").write_text("\n".join(lines) + "\n")
    result = report(damaged)
    assert result.exit_code == 0
    assert [r.split(",")[0] for r in result.stdout.splitlines()[1:]] == ["1", "2"]
    assert "events.jsonl: line 3 not readable" in result.output
    assert "1 imp_round event of a shape this version cannot read; skipped" in result.output


def test_a_round_interrupted_by_a_resume_is_reported_whole(make_engine, tmp_path):
    """The round's tally is checkpointed: resumed mid-round, it still counts all its steps; without the engine's
    loop (train_step alone, as in a loop of your own) a round ends at the next step with no evaluation."""
    policy = parse_policy({"pruning": {"method": "imp", "imp": {"rounds": 1, "round_steps": 3, "fraction": 0.5}}})
    first = make_engine(policy=policy, run_dir=tmp_path / "run", steps=6)
    for _ in range(4):
        first.train_step()
    checkpoint = first.save_checkpoint()
    first.close()
    second = make_engine(policy=policy, run_dir=tmp_path / "run", steps=6)
    second.resume_from(checkpoint)
    assert second.run() == "finished"
    second.close()
    history = read_history(tmp_path / "run")
    rounds = [e for e in history if e["type"] == "imp_round"]
    losses = {e["step"]: e["loss"] for e in history if e["type"] == "step"}
    assert [(r["round"], r["steps"], bool(r["eval"])) for r in rounds] == [(0, 3, False), (1, 3, True)]
    assert rounds[1]["train_loss"] == pytest.approx((losses[4] + losses[5] + losses[6]) / 3, rel=1e-5)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tokenizer):
    """A finished classification run without IMP: 16 steps, embeddings + block0 frozen at step 8."""
    from spu_engine.core.policy import Change, FreezeRule
    from support import record_run

    freeze = Change(freeze=[FreezeRule(units=["embeddings", "block0"], trainable=False)])
    run_dir, history = record_run(
        tmp_path_factory, tokenizer, "plain", [(8, freeze)], steps=16, eval_every=8, stats_every=4
    )
    return run_dir, history


def test_report_of_a_run_without_imp_as_markdown_and_csv(plain_run):
    run_dir, history = plain_run
    evals = [e for e in history if e["type"] == "eval"]
    runner = CliRunner()
    md = runner.invoke(app, ["report", "--run", str(run_dir), "--format", "md"])
    assert md.exit_code == 0, md.output
    lines = md.output.splitlines()
    assert lines[0] == f"## {run_dir.name}" and "| task | classification |" in lines and "| steps | 16 of 16 |" in lines
    assert f"| final eval.accuracy | {evals[-1]['accuracy']:.4f} (step 16) |" in lines
    best = max(evals, key=lambda e: e["accuracy"])
    assert f"| best eval.accuracy | {best['accuracy']:.4f} (step {best['step']}) |" in lines
    assert any(line.startswith("| trainable share | ") for line in lines) and "| methods | 1 freeze rule |" in lines
    assert "| sparsity of the pruning targets | - (no pruning) |" in lines
    assert lines[lines.index("### Policy changes") + 2 :][:3] == [
        "| step | source | change |",
        "|---:|---|---|",
        "| 8 | timeline | freeze embeddings, block0 |",
    ]
    assert "### IMP rounds" not in md.output
    summary = {
        row["field"]: row["value"]
        for row in csv.DictReader(
            io.StringIO(runner.invoke(app, ["report", "--run", str(run_dir), "--format", "csv"]).stdout)
        )
    }
    assert summary["steps"] == "16" and float(summary["final eval.accuracy"]) == evals[-1]["accuracy"]
    assert float(summary["trainable share"]) < 1.0  # embeddings and block0 frozen since step 8
    changes = list(
        csv.DictReader(
            io.StringIO(
                runner.invoke(app, ["report", "--run", str(run_dir), "--format", "csv", "--table", "changes"]).stdout
            )
        )
    )
    assert changes == [{"step": "8", "source": "timeline", "change": "freeze embeddings, block0"}]
    rounds = runner.invoke(app, ["report", "--run", str(run_dir), "--format", "csv", "--table", "rounds"])
    assert rounds.exit_code == 2 and "no IMP rounds to report" in rounds.output
    bad = runner.invoke(app, ["report", "--run", str(run_dir), "--format", "csv", "--table", "evals"])
    assert bad.exit_code == 2 and "--table: 'evals' is not one of summary, changes, rounds" in bad.output


def test_report_plots_as_svg_without_extra_packages_and_png_with_matplotlib(plain_run, imp_run, tmp_path):
    import xml.etree.ElementTree as ET

    runner = CliRunner()
    svg = tmp_path / "loss.svg"
    result = runner.invoke(app, ["report", "--run", str(imp_run[0]), "--plot", str(svg), "--plot-engine", "plotext"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and f"wrote {svg}: loss of run and sparsity of run (plotext)" in result.output
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = "".join(root.itertext()).replace("\xa0", " ")  # rich writes spaces as no-break spaces
    assert "loss of run" in text and "sparsity of run" in text
    png = runner.invoke(
        app, ["report", "--run", str(plain_run[0]), "--plot", str(tmp_path / "loss.png"), "--plot-engine", "plotext"]
    )
    assert png.exit_code == 2 and "a PNG needs matplotlib (pip install 'spu[plots]')" in png.output
    pdf = runner.invoke(app, ["report", "--run", str(plain_run[0]), "--plot", str(tmp_path / "loss.pdf")])
    assert pdf.exit_code == 2 and "write a .svg or .png file (got '.pdf')" in pdf.output
    pytest.importorskip("matplotlib")
    for name in ("loss.png", "figure.svg"):
        result = runner.invoke(
            app, ["report", "--run", str(imp_run[0]), "--plot", str(tmp_path / name), "--format", "md"]
        )
        assert result.exit_code == 0 and "(matplotlib)" in result.output and "### IMP rounds" in result.stdout
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert ET.parse(tmp_path / "figure.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"
