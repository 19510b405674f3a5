"""Two processes under torchrun (gloo on CPU) train exactly like one process with the global batch."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from spu_engine.storage.sharded_checkpoint import is_sharded, read_tensors
from support import SST2, build_tiny

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(
        shutil.which("torchrun") is None
        and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
        reason="torchrun not installed",
    ),
]


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-bert-nodrop")
    build_tiny("bert", tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _train(cmd_prefix, model, policy, run_dir, batch_size, steps=6, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [
        *cmd_prefix,
        "-m",
        "spu_engine.cli",
        "train",
        "--model",
        str(model),
        "--data",
        str(SST2),
        "--steps",
        str(steps),
        "--batch-size",
        str(batch_size),
        "--max-length",
        "32",
        "--max-eval-samples",
        "16",
        "--lr",
        "1e-3",
        "--policy",
        str(policy),
        "--run-dir",
        str(run_dir),
        *extra,
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return weights(run_dir, steps)


def weights(run_dir, step):
    """The model's tensors in the checkpoint of ``step``, whole, whichever way it was written (sharded or not)."""
    path = run_dir / "checkpoints" / f"step-{step:07d}"
    return read_tensors(path) if is_sharded(path) else load_file(str(path / "model.safetensors"))


def _steps(run_dir, kind="step"):
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e for e in events if e["type"] == kind]


def test_two_ranks_match_one_process_with_the_global_batch(no_dropout_model, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "freeze:\n  - {units: [embeddings], trainable: false}\ntimeline:\n  - {step: 3, freeze: [{layers: [0], trainable: false}]}\n"
    )
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = _train(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29531"],
        no_dropout_model,
        policy,
        tmp_path / "two",
        4,
        6,
        *("--system-every", "0.001"),  # rank 0 asks for a sample at (nearly) every boundary: every rank must gather
    )
    one = _train([sys.executable], no_dropout_model, policy, tmp_path / "one", 8)
    system = _steps(tmp_path / "two", "system")
    assert len(system) >= 2 and system[-1]["step"] == 6
    for e in system:  # each rank's own reading, gathered on rank 0
        assert e["world_size"] == 2 and [r["rank"] for r in e["ranks"]] == [0, 1]
        assert all(r["samples_per_s"] > 0 and 0 < r["memory_gb"] <= r["peak_memory_gb"] for r in e["ranks"])
    initial = load_file(str(no_dropout_model / "model.safetensors"))
    for name, tensor in one.items():
        assert torch.allclose(tensor, two[name], atol=2e-5), name
        if "classifier" in name:  # training really moved the weights both runs agree on
            assert not torch.allclose(tensor, initial[name])
        if "embeddings" in name:
            assert torch.equal(tensor, initial[name])


def test_two_ranks_in_micro_batches_match_one_process_with_the_global_batch(no_dropout_model, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("memory: {grad_accum: 2}\ntimeline:\n  - {step: 3, set: {memory: {grad_accum: 4}}}\n")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = _train(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29533"], no_dropout_model, policy, tmp_path / "two", 4
    )
    plain = tmp_path / "plain.yaml"
    plain.write_text("spu_policy: 1\n")
    one = _train([sys.executable], no_dropout_model, plain, tmp_path / "one", 8)
    for name, tensor in one.items():
        assert torch.allclose(tensor, two[name], atol=2e-5), name
    assert [e["micro_batch"] for e in _steps(tmp_path / "two")] == [2, 2, 2, 1, 1, 1]


def test_selective_backprop_selects_globally_and_a_step_nobody_kept_leaves_the_weights(no_dropout_model, tmp_path):
    """Percentile mode: the ranks draw the same batches (as one process with the global batch would); then a
    threshold no sample reaches: no rank has a gradient, and AdamW (decay, momentum) must not move anything."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "selective_backprop: {mode: percentile, keep: 0.4, history: 16}\n"
        "timeline:\n  - {step: 5, set: {selective_backprop: {mode: threshold, threshold: 1.0e+6}}}\n"
    )
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    extra = ("--checkpoint-every", "5")
    two = _train(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29532"],
        no_dropout_model,
        policy,
        tmp_path / "two",
        4,
        8,
        *extra,
    )
    one = _train([sys.executable], no_dropout_model, policy, tmp_path / "one", 8, 8, *extra)
    counts = [
        [(e["step"], e["samples"], e["sb_backward"], e["sb_kept_fraction"]) for e in _steps(run)]
        for run in (tmp_path / "two", tmp_path / "one")
    ]
    assert len(counts[0]) == 8 and counts[0] == counts[1]
    samples = [0] + [seen for _, seen, *_ in counts[0]]
    assert any(b - a > 8 for a, b in itertools.pairwise(samples[:6])), (
        "percentile mode drew more than one batch in some step"
    )
    assert [kept for _, _, kept, _ in counts[0][5:]] == [0, 0, 0]
    for name, tensor in one.items():
        assert torch.allclose(tensor, two[name], atol=2e-5), name
    at_5 = weights(tmp_path / "two", 5)
    for name, tensor in two.items():
        assert torch.equal(tensor, at_5[name]), f"{name} moved in a step where no rank kept a sample"
