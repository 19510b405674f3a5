"""A mean-pooling run end to end: its log says the pooling, its export keeps it (remote code, ``mean_pool`` and
``spu eval`` all give the run's own outputs), and it composes with LoRA and movement pruning."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.model.pooling import mean_pool, pooling_of
from spu_engine.tools.export import export_run, probe_batch
from spu_engine.tools.export.houlsby import load
from support import events_of, small_sst2


def train(run_dir, model_dir, data, policy: dict | None = None, steps: int = 6) -> tuple[torch.Tensor, dict]:
    """A short mean-pooling run; the logits of its final model on a probe batch, and its final evaluation."""
    config = EngineConfig(
        model=str(model_dir),
        data=str(data),
        pooling="mean",
        steps=steps,
        batch_size=8,
        max_length=32,
        max_train_samples=96,
        eval_every=0,
        warmup=0,
        lr=1e-4,
        stats_every=1,  # per-unit statistics with the bypassed pooler's gradient missing
        device="cpu",
    )
    engine = Engine(config, parse_policy(policy or {}), run_dir)
    engine.run()
    assert pooling_of(engine.model) == "mean"
    engine.model.eval()
    with torch.no_grad():
        logits = engine.model(**probe_batch(engine.model.config, batch_size=4, length=24)).logits
    engine.close()
    return logits, events_of(run_dir, "eval")[-1]


def eval_json(model, data) -> dict:
    result = CliRunner().invoke(app, ["eval", "--model", str(model), "--data", str(data), "--split", "dev", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_sst2(tmp_path_factory.mktemp("sst2"))


def test_spu_eval_on_a_mean_pooling_export_gives_the_runs_own_accuracy(tiny_model_dir, data, tmp_path):
    want, final = train(tmp_path / "run", tiny_model_dir, data)
    logs = [e["message"] for e in events_of(tmp_path / "run", "log")]
    assert any(
        m.startswith("pooling: mean, set by the run's pooling setting (the checkpoint's own is cls") for m in logs
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "--run", str(tmp_path / "run"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["spu_pooling"] == "mean"
    assert json.loads((out / "spu_export.json").read_text())["pooling"] == "mean"
    readme = (out / "README.md").read_text()
    assert "- pooling: mean" in readme and "trust_remote_code=True" in readme and "mean_pool(" in readme
    remote = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    batch = probe_batch(remote.config, batch_size=4, length=24)
    with torch.no_grad():
        assert torch.allclose(remote(**batch).logits, want, atol=1e-5)
        plain = mean_pool(AutoModelForSequenceClassification.from_pretrained(out)).eval()
        assert torch.allclose(plain(**batch).logits, want, atol=1e-5)
    scored = eval_json(out, data)
    assert scored["metrics"]["accuracy"] == pytest.approx(final["accuracy"], abs=1e-9)
    assert scored["metrics"]["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-6)
    stock = tmp_path / "stock"  # the same folder read as a stock [CLS] classifier scores otherwise: the pooling counts
    shutil.copytree(out, stock)
    config = json.loads((stock / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("spu_pooling", "auto_map")}
    (stock / "config.json").write_text(json.dumps({**config, "architectures": ["BertForSequenceClassification"]}))
    assert abs(eval_json(stock, data)["metrics"]["eval_loss"] - final["eval_loss"]) > 1e-4
    assert eval_json(tmp_path / "run", data)["metrics"]["accuracy"] == pytest.approx(final["accuracy"], abs=1e-9)


def test_mean_pooling_with_lora_exports_a_peft_folder_spu_eval_scores_like_the_run(tiny_model_dir, data, tmp_path):
    want, final = train(tmp_path / "run", tiny_model_dir, data, {"peft": {"method": "lora", "r": 4}}, steps=6)
    report = export_run(tmp_path / "run", tmp_path / "out")
    assert report.format == "peft" and report.loaded_diff < 1e-5
    assert (tmp_path / "out" / "spu_pooling.py").is_file()
    base = mean_pool(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir))
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(base, tmp_path / "out").eval()
        assert torch.allclose(loaded(**probe_batch(base.config, batch_size=4, length=24)).logits, want, atol=1e-5)
    assert eval_json(tmp_path / "out", data)["metrics"]["accuracy"] == pytest.approx(final["accuracy"], abs=1e-9)


def test_mean_pooling_with_movement_pruning_runs_and_exports(tiny_model_dir, data, tmp_path):
    pruning = {
        "method": "movement",
        "targets": ["*.attention.*.weight", "*dense.weight"],  # BERT's pooler too: bypassed, it gets no gradient
        "schedule": {"start_step": 0, "end_step": 4, "every": 1, "final_sparsity": 0.5},
    }
    want, final = train(tmp_path / "run", tiny_model_dir, data, {"pruning": pruning}, steps=6)
    report = export_run(tmp_path / "run", tmp_path / "out")
    assert report.format == "model" and report.sparsity >= 0.45
    plain = mean_pool(AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")).eval()
    with torch.no_grad():
        assert torch.allclose(plain(**probe_batch(plain.config, batch_size=4, length=24)).logits, want, atol=1e-5)
    assert eval_json(tmp_path / "out", data)["metrics"]["accuracy"] == pytest.approx(final["accuracy"], abs=1e-9)


def test_mean_pooling_with_houlsby_adapters_loads_with_both_in_its_code(tiny_model_dir, data, tmp_path):
    want, final = train(tmp_path / "run", tiny_model_dir, data, {"peft": {"method": "adapter", "size": 8}}, steps=3)
    export_run(tmp_path / "run", tmp_path / "out")
    code = (tmp_path / "out" / "spu_houlsby.py").read_text()
    assert "attach_adapters(self, config.spu_houlsby)" in code and "use_pooling(self, config.spu_pooling)" in code
    remote = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    with torch.no_grad():
        batch = probe_batch(remote.config, batch_size=4, length=24)
        assert torch.allclose(remote(**batch).logits, want, atol=1e-5)
        assert torch.allclose(load(tmp_path / "out")(**batch).logits, want, atol=1e-5)
    assert eval_json(tmp_path / "out", data)["metrics"]["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-6)


def test_a_distillation_teacher_pools_as_it_was_trained(tiny_model_dir, data, tmp_path):
    """'initial' is the run's own model as loaded (mean); a mean-pooling export as teacher is read back mean."""
    from spu_engine.methods.distillation.method import Distillation

    def teacher(run_dir, source) -> str:
        policy = {"distillation": {"enabled": True, "teacher": str(source)}}
        config = EngineConfig(
            model=str(tiny_model_dir), data=str(data), pooling="mean", steps=1, batch_size=4, max_length=16,
            max_train_samples=8, max_eval_samples=4, eval_every=0, device="cpu",
        )  # fmt: skip
        engine = Engine(config, parse_policy(policy), run_dir)
        engine.run()
        kd = next(m for m in engine.methods if isinstance(m, Distillation))
        engine.close()
        return pooling_of(kd.teacher)

    assert teacher(tmp_path / "initial", "initial") == "mean"
    train(tmp_path / "run", tiny_model_dir, data, steps=1)
    export_run(tmp_path / "run", tmp_path / "out")
    assert teacher(tmp_path / "exported", tmp_path / "out") == "mean"
