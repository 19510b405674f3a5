"""spu export: a Hugging Face folder with masks folded in; --compact removes dead FFN neurons and attention heads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.methods.pruning.method import PruningMethod
from spu_engine.model.compact_heads import attention_layout, head_count
from spu_engine.model.loading import count_params, find_block_list
from spu_engine.tools.export import compact_attention, compact_ffn, export_run, probe_batch, remove_blocks, save_model
from spu_engine.tools.export.ffn import ffn_modules as _ffn_modules
from spu_engine.tools.export.ffn import neuron_rows as _neuron_rows
from support import SST2, WIKI, build_tiny


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


def kill_heads(model, per_block: dict[int, list[int]], via: str = "output") -> None:
    """Zero whole heads: their output-projection columns, or their value weights and bias."""
    _, blocks = find_block_list(model)
    with torch.no_grad():
        for i, heads in per_block.items():
            attn_path, qkv, out_path, size_attr, _ = attention_layout(blocks[i])
            attn = blocks[i].get_submodule(attn_path)
            size, n = getattr(attn, size_attr), head_count(blocks[i])
            for h in heads:
                cols = slice(h * size, (h + 1) * size)
                if via == "output":
                    _neuron_rows(blocks[i].get_submodule(out_path), "in")[cols] = 0
                else:
                    value = getattr(attn, qkv[-1])
                    offset = 2 * n * size if len(qkv) == 1 else 0  # the value third of a fused q|k|v
                    vcols = slice(offset + h * size, offset + (h + 1) * size)
                    _neuron_rows(value, "out")[vcols] = 0
                    value.bias[vcols] = 0


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2"])
@pytest.mark.parametrize("via", ["output", "value"])
def test_compact_attention_removes_dead_heads_exactly_and_loads(arch, via, tokenizer, tmp_path):
    task = "lm" if arch == "gpt2" else "classification"
    model = build_tiny(arch, tokenizer, task).eval()
    kill_heads(model, {0: [1], 1: [0, 2], 3: [0, 1, 2, 3]}, via)
    batch = probe_batch(model.config, batch_size=2, length=16)
    with torch.no_grad():
        want = model(**batch)[0]
    before = count_params(model)
    assert compact_attention(model) == (16, 16 - 1 - 2 - 3)  # block 3 keeps one (all-zero) head to stay well-formed
    assert [head_count(b) for b in find_block_list(model)[1]] == [3, 2, 4, 1]
    with torch.no_grad():
        assert torch.allclose(model(**batch)[0], want, atol=1e-5)
    assert count_params(model) < before
    assert save_model(model, tmp_path, task)
    auto = AutoModelForCausalLM if task == "lm" else AutoModelForSequenceClassification
    loaded = auto.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert count_params(loaded) == count_params(model)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch)[0], want, atol=1e-5)


def test_compact_without_dead_heads_writes_a_stock_folder(tokenizer, tmp_path):
    model = build_tiny("bert", tokenizer).eval()
    assert compact_attention(model) == (16, 16)
    assert not save_model(model, tmp_path, "classification")
    assert not (tmp_path / "spu_compact.py").exists()
    AutoModelForSequenceClassification.from_pretrained(tmp_path)


@pytest.fixture
def pruned_run(tiny_model_dir, tmp_path):
    """A finished 2-step run with magnitude masks, plus dead FFN neurons made by hand, checkpointed."""
    policy = parse_policy(
        {
            "pruning": {
                "method": "magnitude",
                "targets": ["*.weight"],
                "schedule": {"kind": "constant", "final_sparsity": 0.5},
            }
        }
    )
    config = EngineConfig(
        model=str(tiny_model_dir),
        data=str(SST2),
        task="classification",
        steps=2,
        batch_size=4,
        max_length=32,
        max_train_samples=64,
        max_eval_samples=16,
        eval_every=0,
        warmup=0,
        lr=1e-3,
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
    for i, heads in {0: [1], 2: [0, 3]}.items():  # attention heads fully pruned (output columns, head size 8)
        name = f"bert.encoder.layer.{i}.attention.output.dense.weight"
        keep = pm.masks.keep(name).clone()
        for h in heads:
            keep[:, h * 8 : (h + 1) * 8] = False
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
        assert torch.equal(params[n], engine.params[n].detach())
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, logits, atol=1e-5)
    assert (tmp_path / "dense" / "tokenizer.json").exists() or (tmp_path / "dense" / "vocab.txt").exists()


def test_export_compact_matches_masked_model_with_fewer_parameters(pruned_run, tmp_path):
    run_dir, _, _, batch, logits = pruned_run
    report = export_run(run_dir, tmp_path / "compact", compact=True)
    assert report.ffn_width == (64, 64 - 10)  # the widest block keeps 54 live neurons
    assert report.heads == (16, 13)
    assert report.params < report.dense_params and report.max_abs_diff < 1e-5
    assert any("trust_remote_code=True" in n for n in report.notes)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "compact", trust_remote_code=True).eval()
    assert loaded.config.intermediate_size == 54 and count_params(loaded) == report.params
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, logits, atol=1e-5)


def test_export_cli_reports_and_refuses_bad_input(pruned_run, tmp_path):
    run_dir = pruned_run[0]
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--run", str(run_dir), "--out", str(tmp_path / "out"), "--compact"])
    assert result.exit_code == 0, result.output
    assert "parameters: dense" in result.output and "FFN width: 64 -> 54" in result.output
    assert "attention heads: 16 -> 13" in result.output and "trust_remote_code=True" in result.output
    again = runner.invoke(app, ["export", "--run", str(run_dir), "--out", str(tmp_path / "out")])
    assert again.exit_code == 2 and "previous export" in again.output and "Traceback" not in again.output
    missing = runner.invoke(app, ["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])
    assert missing.exit_code == 2 and "not a run folder" in missing.output
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.json").write_text((run_dir / "config.json").read_text())
    none = runner.invoke(app, ["export", "--run", str(empty), "--out", str(tmp_path / "o3")])
    assert none.exit_code == 2 and "no complete checkpoint" in none.output


def test_structured_pruning_exports_a_smaller_faster_model(tiny_model_dir, tmp_path):
    """heads_neurons pruning, then --compact: whole heads and neurons go, outputs stay those of the masked model."""
    policy = parse_policy(
        {
            "pruning": {
                "method": "magnitude",
                "structure": "heads_neurons",
                "scope": "per_layer",
                "schedule": {"kind": "constant", "final_sparsity": 0.5},
            }
        }
    )
    config = EngineConfig(
        model=str(tiny_model_dir),
        data=str(SST2),
        task="classification",
        steps=3,
        batch_size=4,
        max_length=32,
        max_train_samples=64,
        max_eval_samples=16,
        eval_every=0,
        warmup=0,
        lr=1e-3,
    )
    engine = Engine(config, policy, tmp_path / "run")
    engine.run()
    engine.save_checkpoint()
    engine.model.eval()
    batch = probe_batch(engine.model.config, batch_size=4, length=24)
    with torch.no_grad():
        logits = engine.model(**batch).logits
    pm = next(m for m in engine.methods if isinstance(m, PruningMethod))
    grouped = sum(
        engine.params[n].numel() for n in pm.targets
    )  # the blocks' attention and FFN weights, half of them pruned
    engine.close()
    report = export_run(tmp_path / "run", tmp_path / "compact", compact=True)
    assert report.heads[1] < report.heads[0] and report.ffn_width[1] < report.ffn_width[0]
    assert report.dense_params - report.params > 0.3 * grouped and report.max_abs_diff < 1e-5
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "compact", trust_remote_code=True).eval()
    assert count_params(loaded) == report.params
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, logits, atol=1e-5)


# --------------------------------------------------------------------------- dead units and whole blocks


def random_biases(model) -> None:
    """Biases from config are zero; non-zero ones make the folding and the block shifts matter."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))


def silence_neurons(model, per_block: list[int]) -> None:
    """Zero the input rows (weights only) of the first ``n`` FFN neurons: each still outputs act(bias) into its column."""
    _, blocks = find_block_list(model)
    with torch.no_grad():
        for block, n in zip(blocks, per_block):
            ins, _, _ = _ffn_modules(block)
            for m in ins:
                _neuron_rows(m, "out")[:n] = 0


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2"])
def test_neurons_with_zero_input_rows_are_folded_into_the_output_bias(arch, tokenizer, tmp_path):
    task = "lm" if arch == "gpt2" else "classification"
    model = build_tiny(arch, tokenizer, task).eval()
    random_biases(model)
    silence_neurons(model, [40, 50, 30, 45])
    batch = probe_batch(model.config, batch_size=2, length=16)
    with torch.no_grad():
        want = model(**batch)[0]
    old, new = compact_ffn(model)
    assert new == old - 30  # the constant act(bias) of each silenced neuron went into the output bias
    with torch.no_grad():
        assert torch.allclose(model(**batch)[0], want, atol=1e-5)
    model.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if task == "lm" else AutoModelForSequenceClassification
    with torch.no_grad():
        assert torch.allclose(auto.from_pretrained(tmp_path).eval()(**batch)[0], want, atol=1e-5)


def kill_block(model, i: int, how: str) -> None:
    """Every head and FFN neuron of block ``i`` dead, biases left as they are: by zero output columns, or by zero
    values (weights and bias) and FFN input rows (act(bias) then goes through the output columns)."""
    block = find_block_list(model)[1][i]
    n = head_count(block)
    kill_heads(model, {i: list(range(n))}, "output" if how == "outputs" else "value")
    ins, out, _ = _ffn_modules(block)
    with torch.no_grad():
        if how == "outputs":
            _neuron_rows(out, "in")[:] = 0
        else:
            for m in ins:
                _neuron_rows(m, "out")[:] = 0


@pytest.mark.parametrize("dead", [{2: "outputs"}, {0: "inputs"}, {0: "outputs", 1: "inputs", 3: "outputs"}])
def test_gpt2_blocks_that_only_add_a_constant_are_removed_with_equal_outputs(dead, tokenizer, tmp_path):
    model = build_tiny("gpt2", tokenizer, "lm").eval()
    random_biases(model)
    for i, how in dead.items():
        kill_block(model, i, how)
    batch = probe_batch(model.config, batch_size=2, length=16)
    with torch.no_grad():
        want = model(**batch)[0]
    notes: list[str] = []
    compact_ffn(model)
    assert remove_blocks(model, notes) == (4, 4 - len(dead))
    assert f"blocks {sorted(dead)} removed" in notes[0]
    with torch.no_grad():
        assert torch.allclose(model(**batch)[0], want, atol=1e-5)
        assert torch.allclose(model(**batch, use_cache=False)[0], want, atol=1e-5)
    assert not save_model(model, tmp_path, "lm")  # nothing custom: a stock folder with n_layer lowered
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.n_layer == 4 - len(dead)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch)[0], want, atol=1e-5)
    generated = loaded.generate(
        batch["input_ids"][:1, :4], max_new_tokens=3, do_sample=False
    )  # the cache follows the new indices
    assert generated.shape == (1, 7)


def test_a_gpt2_model_keeps_one_block(tokenizer):
    model = build_tiny("gpt2", tokenizer, "lm").eval()
    random_biases(model)
    for i in range(4):
        kill_block(model, i, "outputs")
    batch = probe_batch(model.config, batch_size=2, length=16)
    with torch.no_grad():
        want = model(**batch)[0]
    compact_ffn(model)
    assert remove_blocks(model, []) == (4, 1)
    with torch.no_grad():
        assert torch.allclose(model(**batch)[0], want, atol=1e-5)


def test_a_dead_post_ln_block_stays_and_the_export_says_why(tokenizer):
    model = build_tiny("bert", tokenizer).eval()
    random_biases(model)
    kill_block(model, 1, "outputs")
    batch = probe_batch(model.config, batch_size=2, length=16)
    with torch.no_grad():
        want = model(**batch)[0]
    notes: list[str] = []
    compact_ffn(model)
    assert remove_blocks(model, notes) == (4, 4)
    assert "blocks [1]" in notes[0] and "post-LN" in notes[0] and "LayerNorms" in notes[0]
    with torch.no_grad():
        assert torch.allclose(model(**batch)[0], want, atol=1e-5)


def test_export_of_a_gpt2_run_with_a_fully_pruned_block_has_one_block_fewer(tiny_gpt2_dir, tmp_path):
    """Masks that prune every weight of block 1 (the biases stay, as pruning leaves them): the compact folder has
    three blocks, loads with plain from_pretrained and gives the masked model's logits."""
    policy = parse_policy({"pruning": {"method": "magnitude", "schedule": {"kind": "constant", "final_sparsity": 0.3}}})
    config = EngineConfig(
        model=str(tiny_gpt2_dir),
        data=str(WIKI),
        task="lm",
        steps=2,
        batch_size=4,
        max_length=32,
        max_train_samples=32,
        max_eval_samples=8,
        eval_every=0,
        warmup=0,
        lr=1e-3,
    )
    engine = Engine(config, policy, tmp_path / "run")
    engine.run()
    pm = next(m for m in engine.methods if isinstance(m, PruningMethod))
    for name in pm.targets:
        if ".h.1." in name:
            pm.masks.set(name, torch.zeros_like(pm.masks.keep(name)))
    engine.save_checkpoint()
    engine.model.eval()
    batch = probe_batch(engine.model.config, batch_size=2, length=24)
    with torch.no_grad():
        logits = engine.model(**batch).logits
    engine.close()
    result = CliRunner().invoke(
        app, ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "compact"), "--compact"]
    )
    assert result.exit_code == 0, result.output
    assert "blocks: 4 -> 3" in result.output and "blocks [1] removed" in result.output
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compact").eval()
    assert loaded.config.n_layer == 3
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, logits, atol=1e-5)
