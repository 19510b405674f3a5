"""What the many-rank tests share: tiny models without dropout, `spu train` arguments, torchrun, reading results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sft_support import CHAT_TEMPLATE
from spu_engine.storage.sharded_checkpoint import is_sharded, read_tensors
from support import GSM8K, SST2, build_tiny

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
NO_TORCHRUN = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def tiny_folders(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A tiny BERT classifier and a tiny Llama with a chat template, no dropout (so ranks and one process agree)."""
    out = {}
    for arch, task in (("bert", "classification"), ("llama", "lm")):
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        drop = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if arch == "bert" else {}
        build_tiny(arch, tokenizer, task, **drop).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if arch == "llama":
            config = json.loads((folder / "tokenizer_config.json").read_text())
            (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
        out[arch] = folder
    return out


def train_args(model, arch, run_dir, batch_size, steps, policy, *extra: str) -> list[str]:
    """`spu train` on SST-2 (bert) or GSM8K SFT (llama), short examples, no evaluation until the end."""
    data = ["--data", str(SST2)] if arch == "bert" else ["--data", str(GSM8K), "--task", "sft"]
    return [
        *("-m", "spu_engine.cli", "train", "--model", str(model), *data),
        *("--steps", str(steps), "--batch-size", str(batch_size), "--max-length", "48"),
        *("--max-train-samples", "256", "--max-eval-samples", "8", "--eval-every", "0", "--lr", "1e-3"),
        *("--warmup", "0", "--policy", str(policy), "--run-dir", str(run_dir), *extra),
    ]


def two_ranks(port: int) -> list[str]:
    return [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port)]


def run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


def step_losses(run_dir) -> dict[int, float]:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in events if e["type"] == "step"}


def weights(path) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors, whole, whichever way it was written (sharded or not)."""
    return read_tensors(path) if is_sharded(path) else load_file(str(path / "model.safetensors"))


def assert_same_model(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], atol: float = 3e-5) -> None:
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        assert torch.allclose(tensor, theirs[name], atol=atol), name
