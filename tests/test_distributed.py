"""Two processes under torchrun (gloo on CPU) train exactly like one process with the global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import SST2, build_tiny

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-bert-nodrop")
    build_tiny("bert", tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _train(cmd_prefix, model, policy, run_dir, batch_size):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [*cmd_prefix, "-m", "spu_engine.cli", "train", "--model", str(model), "--data", str(SST2), "--steps", "6",
            "--batch-size", str(batch_size), "--max-length", "32", "--max-eval-samples", "16", "--lr", "1e-3",
            "--policy", str(policy), "--run-dir", str(run_dir)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return load_file(str(run_dir / "checkpoints" / "step-0000006" / "model.safetensors"))


def test_two_ranks_match_one_process_with_the_global_batch(no_dropout_model, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("freeze:\n  - {units: [embeddings], trainable: false}\ntimeline:\n  - {step: 3, freeze: [{layers: [0], trainable: false}]}\n")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = _train([torchrun, "--nproc_per_node", "2", "--master_port", "29531"], no_dropout_model, policy, tmp_path / "two", 4)
    one = _train([sys.executable], no_dropout_model, policy, tmp_path / "one", 8)
    initial = load_file(str(no_dropout_model / "model.safetensors"))
    for name, tensor in one.items():
        assert torch.allclose(tensor, two[name], atol=2e-5), name
        if "classifier" in name:  # training really moved the weights both runs agree on
            assert not torch.allclose(tensor, initial[name])
        if "embeddings" in name:
            assert torch.equal(tensor, initial[name])
