"""spu export: a Hugging Face folder with masks folded in; --compact removes dead FFN neurons."""

from __future__ import annotations

import pytest
import torch
from conftest import SST2, build_tiny
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.engine import Engine, EngineConfig
from spu_engine.export import _ffn_modules, _neuron_rows, compact_ffn, count_params, export_run, probe_batch
from spu_engine.methods.pruning import PruningMethod
from spu_engine.model import find_block_list
from spu_engine.policy import parse_policy


def kill_neurons(model, per_block: list[int]) -> None:
    """Zero the output columns of the first ``n`` FFN neurons of each block (a different n per block)."""
    _, blocks = find_block_list(model)
    with torch.no_grad():
        for block, n in zip(blocks, per_block):
            _, out, _ = _ffn_modules(block)
            _neuron_rows(out, "in")[:n] = 0


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2", "llama"])
def test_compact_ffn_is_exact_smaller_and_loadable(arch, tokenizer, tmp_path):
    task = "lm" if arch in ("gpt2", "llama") else "classification"
    model = build_tiny(arch, tokenizer, task).eval()
    kill_neurons(model, [40, 50, 30, 45])
    batch = probe_batch(model.config, batch_size=2, length=16)
    with torch.no_grad():
        want = model(**batch)[0]
    before = count_params(model)
    old, new = compact_ffn(model)
    assert old in (64, 128) and new == old - 30  # the widest block keeps old - 30 live neurons
    with torch.no_grad():
        assert torch.allclose(model(**batch)[0], want, atol=1e-5)
    assert count_params(model) < before
    model.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if task == "lm" else AutoModelForSequenceClassification
    loaded = auto.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch)[0], want, atol=1e-5)


@pytest.fixture
def pruned_run(tiny_model_dir, tmp_path):
    """A finished 2-step run with magnitude masks, plus dead FFN neurons made by hand, checkpointed."""
    policy = parse_policy({"pruning": {"method": "magnitude", "targets": ["*.weight"], "schedule": {"kind": "constant", "final_sparsity": 0.5}}})
    config = EngineConfig(
        model=str(tiny_model_dir), data=str(SST2), task="classification", steps=2, batch_size=4, max_length=32,
        max_train_samples=64, max_eval_samples=16, eval_every=0, warmup=0, lr=1e-3,
    )
    run_dir = tmp_path / "run"
    engine = Engine(config, policy, run_dir)
    engine.run()
    pm = next(m for m in engine.methods if isinstance(m, PruningMethod))
    for i, n in enumerate([20, 35, 10, 25]):  # FFN output columns fully pruned, as structured pruning would leave them
        name = f"bert.encoder.layer.{i}.output.dense.weight"
        keep = pm.masks.keep(name).clone()
        keep[:, :n] = False
        pm.masks.set(name, keep)
    engine.save_checkpoint()
    engine.model.eval()
    batch = probe_batch(engine.model.config, batch_size=4, length=24)
    with torch.no_grad():
        logits = engine.model(**batch).logits
    engine.close()
    return run_dir, pm, engine, batch, logits


def test_export_dense_folds_masks_and_loads(pruned_run, tmp_path):
    run_dir, pm, engine, batch, logits = pruned_run
    report = export_run(run_dir, tmp_path / "dense")
    assert report.masked_tensors == len(pm.targets) and report.sparsity >= 0.5
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense").eval()
    params = dict(loaded.named_parameters())
    for n in pm.targets:
        assert torch.equal(params[n], pm.effective(n, engine.params[n]))
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, logits, atol=1e-5)
    assert (tmp_path / "dense" / "tokenizer.json").exists() or (tmp_path / "dense" / "vocab.txt").exists()


def test_export_compact_matches_masked_model_with_fewer_parameters(pruned_run, tmp_path):
    run_dir, _, _, batch, logits = pruned_run
    report = export_run(run_dir, tmp_path / "compact", compact=True)
    assert report.ffn_width == (64, 64 - 10)  # the widest block keeps 54 live neurons
    assert report.params < report.dense_params and report.max_abs_diff < 1e-5
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "compact").eval()
    assert loaded.config.intermediate_size == 54 and count_params(loaded) == report.params
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, logits, atol=1e-5)


def test_export_cli_reports_and_refuses_bad_input(pruned_run, tmp_path):
    run_dir = pruned_run[0]
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--run", str(run_dir), "--out", str(tmp_path / "out"), "--compact"])
    assert result.exit_code == 0, result.output
    assert "parameters: dense" in result.output and "FFN width: 64 -> 54" in result.output
    again = runner.invoke(app, ["export", "--run", str(run_dir), "--out", str(tmp_path / "out")])
    assert again.exit_code == 2 and "not empty" in again.output and "Traceback" not in again.output
    missing = runner.invoke(app, ["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])
    assert missing.exit_code == 2 and "not a run folder" in missing.output
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.json").write_text((run_dir / "config.json").read_text())
    none = runner.invoke(app, ["export", "--run", str(empty), "--out", str(tmp_path / "o3")])
    assert none.exit_code == 2 and "no complete checkpoint" in none.output
