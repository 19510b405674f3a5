"""spu export of PEFT runs: peft adapter folders (LoRA, (IA)3, AdaLoRA) that PeftModel loads, a Houlsby-adapter
folder that from_pretrained loads with its code, and `spu eval` scoring each like the run folder."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.tools.export import ExportError, export_run, probe_batch
from spu_engine.tools.export.houlsby import load
from spu_engine.tools.export.run import _reference
from support import DATA, SST2

MRPC = DATA / "mrpc"


def train(run_dir, model_dir, peft: dict, data=SST2, steps: int = 3) -> torch.Tensor:
    """A short run with ``peft``; the logits of its final model on a probe batch."""
    config = EngineConfig(
        model=str(model_dir),
        data=str(data),
        task="classification",
        steps=steps,
        batch_size=4,
        max_length=32,
        max_train_samples=32,
        max_eval_samples=8,
        eval_every=0,
        warmup=0,
        lr=5e-3,
        stats_every=1,
        device="cpu",
    )
    engine = Engine(config, parse_policy({"peft": peft}), run_dir)
    engine.run()
    engine.model.eval()
    with torch.no_grad():
        logits = engine.model(**probe_batch(engine.model.config, batch_size=4, length=24)).logits
    engine.close()
    return logits


def peft_logits(model_dir, folder) -> torch.Tensor:
    """The folder loaded the way a peft user does, onto the untouched base model."""
    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        return model(**probe_batch(base.config, batch_size=4, length=24)).logits


def test_lora_exports_a_peft_folder_with_the_runs_logits(tiny_model_dir, tmp_path):
    want = train(tmp_path / "run", tiny_model_dir, {"method": "lora", "r": 4, "alpha": 8})
    out = tmp_path / "out"
    report = export_run(tmp_path / "run", out)
    assert report.format == "peft" and report.loaded_diff < 1e-5
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["task_type"]) == ("LORA", 4, 8, "SEQ_CLS")
    assert set(config["target_modules"]) == {"query", "value"} and "classifier" in config["modules_to_save"]
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve()) and config["init_lora_weights"] is True
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.classifier.weight" in keys and not any("key" in k or "base_layer" in k for k in keys)
    assert torch.allclose(peft_logits(tiny_model_dir, out), want, atol=1e-5)
    info = json.loads((out / "spu_export.json").read_text())
    assert (info["format"], info["task"], info["labels"]) == ("peft", "classification", ["0", "1"])
    assert "PeftModel.from_pretrained(base, folder)" in (out / "README.md").read_text()
    merged = export_run(tmp_path / "run", tmp_path / "merged", merge=True)  # --merge: a plain model, as before
    assert (
        merged.format == "model"
        and merged.merged_diff < 1e-4
        and not (tmp_path / "merged" / "adapter_config.json").exists()
    )
    with pytest.raises(ExportError, match="--compact needs --merge"):
        export_run(tmp_path / "run", tmp_path / "compact", compact=True)


@pytest.fixture(scope="module")
def houlsby_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("houlsby")
    return root / "run", train(root / "run", tiny_model_dir, {"method": "adapter", "size": 8})


def test_houlsby_exports_a_folder_that_loads_with_its_code_or_spu_load(houlsby_run, tmp_path):
    run, want = houlsby_run
    result = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "trust_remote_code=True" in result.output and "houlsby.load(folder)" in result.output
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["spu_houlsby"]["size"] == 8
    remote = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    batch = probe_batch(remote.config, batch_size=4, length=24)
    with torch.no_grad():
        assert torch.allclose(remote(**batch).logits, want, atol=1e-5)
        assert torch.allclose(load(out)(**batch).logits, want, atol=1e-5)
    assert "trust_remote_code=True" in (out / "README.md").read_text()
    refused = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "m"), "--merge"])
    assert refused.exit_code == 2 and "cannot be folded" in refused.output and "Traceback" not in refused.output
    assert not any(p.name.startswith(("adapter_", "spu_")) for p in run.rglob("*"))  # the run folder is not written


def eval_json(model, data) -> dict:
    result = CliRunner().invoke(app, ["eval", "--model", str(model), "--data", str(data), "--split", "dev", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    "peft",
    [
        {"method": "adapter", "size": 8},
        pytest.param({"method": "lora", "r": 4}, marks=pytest.mark.slow),
        pytest.param({"method": "ia3"}, marks=pytest.mark.slow),
        pytest.param(
            {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1}, marks=pytest.mark.slow
        ),
    ],
)
def test_spu_eval_scores_each_export_on_mrpc_dev_like_the_run(peft, tiny_model_dir, tmp_path):
    data = tmp_path / "mrpc"
    data.mkdir()
    lines = (MRPC / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (data / "train.tsv").write_text("".join(lines[:65]), encoding="utf-8")
    (data / "dev.tsv").write_text((MRPC / "dev.tsv").read_text(encoding="utf-8"), encoding="utf-8")  # all 408 rows
    train(tmp_path / "run", tiny_model_dir, peft, data=data, steps=4)
    export_run(tmp_path / "run", tmp_path / "out")
    run, exported = eval_json(tmp_path / "run", MRPC), eval_json(tmp_path / "out", MRPC)
    assert exported["checkpoint"] is None and exported["metrics"]["eval_samples"] == 408
    assert (exported["metric"], exported["task"]) == (run["metric"], run["task"]) == ("f1", "classification")
    for key in ("eval_loss", "accuracy", "f1"):
        assert exported["metrics"][key] == pytest.approx(run["metrics"][key], abs=1e-6), key


def test_ia3_and_adalora_folders_say_what_peft_reads(tiny_model_dir, tmp_path):
    want = train(tmp_path / "ia3", tiny_model_dir, {"method": "ia3"})
    export_run(tmp_path / "ia3", tmp_path / "ia3-out")
    config = json.loads((tmp_path / "ia3-out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] and "classifier" in config["modules_to_save"]
    assert torch.allclose(peft_logits(tiny_model_dir, tmp_path / "ia3-out"), want, atol=1e-5)
    peft = {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2}
    want = train(tmp_path / "ada", tiny_model_dir, peft, steps=6)
    export_run(tmp_path / "ada", tmp_path / "ada-out")
    config = json.loads((tmp_path / "ada-out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"] and config["init_r"] == 4
    kept = {k.removesuffix(".lora_E"): sum(v) for k, v in config["rank_pattern"].items()}
    tensors = load_file(str(tmp_path / "ada-out" / "adapter_model.safetensors"))
    for module, rank in kept.items():  # each matrix saved at the rank AdaLoRA kept
        assert tensors[f"base_model.model.{module}.lora_A"].shape[0] == rank
    assert torch.allclose(peft_logits(tiny_model_dir, tmp_path / "ada-out"), want, atol=1e-5)


def test_a_lora_target_pruned_underneath_needs_merge(tiny_model_dir, tmp_path):
    pruning = {
        "method": "magnitude",
        "targets": ["*.query.weight"],
        "schedule": {"kind": "constant", "final_sparsity": 0.5},
    }
    config = EngineConfig(
        model=str(tiny_model_dir),
        data=str(SST2),
        steps=1,
        batch_size=4,
        max_length=16,
        max_train_samples=8,
        max_eval_samples=4,
        eval_every=0,
        warmup=0,
        device="cpu",
    )
    engine = Engine(config, parse_policy({"peft": {"method": "lora", "r": 2}, "pruning": pruning}), tmp_path / "run")
    engine.run()
    engine.close()
    with pytest.raises(ExportError, match=r"query.weight differs from the base model's .*export with --merge"):
        export_run(tmp_path / "run", tmp_path / "out")
    assert export_run(tmp_path / "run", tmp_path / "merged", merge=True).sparsity == pytest.approx(0.5, abs=0.01)


def test_the_offline_minilm_is_named_by_its_hub_id_in_adapter_folders(minilm_dir, tiny_model_dir):
    assert _reference(str(minilm_dir)) == _reference("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert _reference(str(tiny_model_dir)) == str(tiny_model_dir)
