"""SFT evaluation: the final answer read off GSM8K-style text, greedy generations scored by exact match, `spu eval`
and `spu report` on an SFT run, and the selective-update methods composed with SFT."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.tasks import TaskOptions
from spu_engine.tasks.sft import SftTask
from spu_engine.tasks.sft_generate import final_answer
from spu_engine.tools.report import load_run_report
from spu_tui.run_model import RunModel
from support import build_tiny

NEW = 6  # tokens a generation may add: enough for '#### 8' in WordPiece
GENERATE = TaskOptions(max_length=64, generate_eval=3, max_new_tokens=NEW)


def test_the_final_answer_is_read_after_the_marker():
    assert final_answer("48 + 24 = <<48+24=72>>72\n#### 72") == "72"
    assert final_answer("#### 1,000") == "1000"
    assert final_answer("so -5.\n#### -5.") == "-5"
    assert final_answer("#### $3.50") == "3.50"
    assert final_answer("# # # # 1, 000") == "1000"  # a WordPiece decode of '#### 1,000'
    assert final_answer("first #### 3 then #### 4") == "4"
    assert final_answer("#### yes.") == "yes"
    assert final_answer("the answer is 72") is None


def test_generations_are_scored_by_exact_match(chat_tokenizer, gsm8k_like):
    task = SftTask.build(str(gsm8k_like), chat_tokenizer, GENERATE)
    assert task.eval_fields == ("eval_loss", "perplexity", "eval_tokens", "exact_match", "eval_generated")
    model = build_tiny("llama", chat_tokenizer, "lm").eval()
    batches = [task.collate(task.eval[i : i + 2]) for i in range(0, len(task.eval), 2)]  # generation spans batches
    real_generate, new_tokens = model.generate, []

    def greedy(**kwargs):
        out = real_generate(**kwargs)
        new_tokens.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = greedy
    metrics = task.evaluate(model, batches)
    assert len(new_tokens) == 2 and max(new_tokens) <= NEW  # prompts 0-1 in the first batch, 2 in the second
    assert set(metrics) == set(task.eval_fields) and metrics["eval_generated"] == 3
    assert 0 <= metrics["exact_match"] <= 1 and math.isfinite(metrics["perplexity"])
    assert len(task.generations) == 3 and all(g.correct is not None for g in task.generations)
    lines = task.shown()
    assert (
        len(lines) == 3
        and lines[0].startswith("generation 1 of 3: ")
        and "what is 7 plus 1? < assistant > -> " in lines[0]
    )

    # a model that answers with each reference scores 100; the loss figures do not depend on generation
    def answers_with_the_reference(input_ids, attention_mask, generation_config):
        assert generation_config.do_sample is False and generation_config.max_new_tokens == NEW
        rows = [
            task.prompts.index([t for t, m in zip(r, k) if m])
            for r, k in zip(input_ids.tolist(), attention_mask.tolist())
        ]
        tails = [chat_tokenizer(task.references[i], add_special_tokens=False)["input_ids"][-NEW:] for i in rows]
        width = max(len(t) for t in tails)
        tails = [t + [chat_tokenizer.sep_token_id] * (width - len(t)) for t in tails]
        return torch.cat([input_ids, torch.tensor(tails)], dim=1)

    model.generate = answers_with_the_reference
    right = task.evaluate(model, batches)
    assert right["exact_match"] == 1.0 and right["eval_loss"] == pytest.approx(metrics["eval_loss"])
    assert all(g.correct for g in task.generations) and "[right: expected" in task.shown()[0]


def test_references_without_a_final_answer_are_shown_not_scored(chat_tokenizer, shape_files):
    options = TaskOptions(max_length=64, eval_split=0, generate_eval=2, max_new_tokens=2)
    task = SftTask.build(str(shape_files["prompt/completion"]), chat_tokenizer, options)
    assert "exact_match" not in task.eval_fields
    metrics = task.evaluate(build_tiny("llama", chat_tokenizer, "lm").eval(), [task.collate(task.eval)])
    assert "exact_match" not in metrics and len(task.shown()) == 2 and "expected" not in task.shown()[0]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, llama_dir, gsm8k_like):
    """A finished SFT run (model and tokenizer from the Llama folder) that evaluated twice with generations."""
    run_dir = tmp_path_factory.mktemp("sft-run")
    events: list[dict] = []
    config = EngineConfig(
        model=str(llama_dir),
        data=str(gsm8k_like),
        steps=4,
        batch_size=4,
        eval_every=2,
        max_length=64,
        generate_eval=2,
        max_new_tokens=3,
        lr=1e-3,
        warmup=0,
        device="cpu",
    )
    engine = Engine(config, None, run_dir, sinks=[lambda _line, ev: events.append(ev)])
    assert engine.task.name == "sft" and engine.run() == "finished"
    engine.close()
    return run_dir, events


def test_an_sft_run_logs_its_generations_and_reports_its_metrics(sft_run):
    run_dir, events = sft_run
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    assert all({"eval_loss", "perplexity", "exact_match"} <= set(e) for e in evals)
    shown = [e for e in events if e["type"] == "log" and e.get("about") == "generation"]
    assert [e["step"] for e in shown] == [2, 2, 4, 4] and shown[0]["message"].startswith("generation 1 of 2: ")
    console = RunModel()  # the console's log panel shows them as they came
    for ev in events:
        console.apply(ev)
    assert [line.text for line in console.log if line.kind == "log" and line.text.startswith("generation")] == [
        e["message"] for e in shown
    ]
    summary = {name: value for name, value, _ in load_run_report(run_dir).summary()}
    assert summary["task"] == "sft"
    assert summary["final eval.perplexity"] == pytest.approx(evals[-1]["perplexity"])
    assert summary["final eval.exact_match"] == evals[-1]["exact_match"]


def test_spu_eval_scores_an_sft_run_on_held_out_data(sft_run, gsm8k_like, tmp_path):
    run_dir, events = sft_run
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text(json.dumps({"question": "what is 9 plus 9?", "answer": "9 + 9 = 18\n#### 18"}) + "\n")
    result = CliRunner().invoke(
        app,
        ["eval", "--model", str(run_dir), "--data", str(held_out), "--generate-eval", "1", "--device", "cpu", "--json"],
    )
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    assert (
        scored["task"] == "sft" and scored["metric"] == "perplexity" and scored["checkpoint"].endswith("step-0000004")
    )
    assert scored["metrics"]["eval_generated"] == 1 and scored["metrics"]["exact_match"] in (0, 1)
    assert len(scored["generations"]) == 1 and scored["generations"][0]["reference"].endswith("#### 18")
    # the run's own dev file gives the figures of the run's last evaluation
    dev = CliRunner().invoke(
        app, ["eval", "--model", str(run_dir), "--data", str(gsm8k_like), "--device", "cpu", "--json"]
    )
    assert dev.exit_code == 0, dev.output
    last = [e for e in events if e["type"] == "eval"][-1]
    assert json.loads(dev.stdout.strip().splitlines()[-1])["metrics"]["perplexity"] == pytest.approx(
        last["perplexity"], rel=1e-4
    )


def test_the_kl_counts_completion_tokens_only(chat_tokenizer, gsm8k_like):
    task = SftTask.build(str(gsm8k_like), chat_tokenizer, TaskOptions(max_length=64, max_train_samples=4))
    batch = task.collate(task.train)
    teacher = torch.randn(*batch["input_ids"].shape, 50)
    student = teacher.clone()
    completion = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100) != -100  # positions predicting one
    student[~completion] = torch.randn_like(student[~completion])  # differs on prompt and padding positions only
    assert torch.allclose(task.per_sample_kl((student,), (teacher,), batch, 2.0), torch.zeros(4), atol=1e-6)
    student[completion] += torch.randn_like(student[completion])
    assert (task.per_sample_kl((student,), (teacher,), batch, 2.0) > 0).all()


POLICIES = {
    "lora": {"peft": {"method": "lora", "r": 2}},
    "selective_backprop": {"selective_backprop": {"mode": "percentile", "keep": 0.5}},
    "distillation": {"distillation": {"enabled": True, "teacher": "initial", "alpha": 0.5}},
    "lisa": {"auto_freeze": {"method": "lisa", "interval": 1, "n_layers": 1}},
    "freeze+pruning": {
        "freeze": [{"layers": [0], "trainable": False}],
        "pruning": {
            "method": "magnitude",
            "targets": ["*.mlp.up_proj.weight"],
            "schedule": {"start_step": 0, "end_step": 2, "every": 1, "final_sparsity": 0.5},
        },
    },
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_methods_compose_with_sft(chat_tokenizer, gsm8k_like, name):
    task = SftTask.build(str(gsm8k_like), chat_tokenizer, TaskOptions(max_length=64, max_eval_samples=4))
    steps: list[dict] = []
    config = EngineConfig(
        model="tiny", data="unused", task="sft", steps=3, batch_size=8, eval_every=0, warmup=0, lr=1e-3
    )
    engine = Engine(
        config,
        parse_policy(POLICIES[name]),
        model=build_tiny("llama", chat_tokenizer, "lm"),
        tokenizer=chat_tokenizer,
        task=task,
        sinks=[lambda _line, ev: steps.append(ev) if ev["type"] == "step" else None],
    )
    total = sum(p.numel() for p in engine.model.parameters())
    assert engine.run() == "finished" and len(steps) == 3 and math.isfinite(steps[-1]["loss"])
    if name == "lora":
        assert 0 < steps[-1]["trainable"] < total / 50
    if name == "selective_backprop":
        assert steps[-1]["sb_skipped"] > 0 and steps[-1]["sb_kept_fraction"] < 1
    if name == "freeze+pruning":
        assert steps[-1]["pruning"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert math.isfinite(engine.evaluate()["perplexity"])
