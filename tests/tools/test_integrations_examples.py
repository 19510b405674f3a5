"""The example scripts of examples/ run end to end (tiny model, a few steps) with their policy."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

from spu_engine.model.loading import find_units
from support import SST2

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["plain_pytorch", "hf_trainer"])
def test_example_trains_and_evaluates(script, tiny_model_dir, capsys):
    metrics = _load(script).main(
        [
            "--model",
            str(tiny_model_dir),
            "--data",
            str(SST2),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--max-length",
            "32",
            "--max-eval-samples",
            "16",
            "--lr",
            "1e-3",
        ]
    )
    assert metrics["eval_samples"] == 16 and 0 <= metrics["accuracy"] <= 1
    out = capsys.readouterr().out
    assert "eval: eval_loss" in out
    # the example policy freezes the embeddings and blocks 0-2 (block 2 comes back at step 20, after these 4 steps)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    units = find_units(model)
    expected = sum(
        p.numel()
        for n, p in model.named_parameters()
        if units.unit_of[n] not in ("embeddings", "block0", "block1", "block2")
    )
    last = [line for line in out.splitlines() if "trainable" in line][-1]
    assert re.search(r"trainable(?: at the end:)? ([\d,]+)", last).group(1).replace(",", "") == str(expected)
