"""A probe batch of random token ids, and the time of one forward pass on it: how an export compares two models."""

from __future__ import annotations

import time

import torch
from torch import nn


def probe_batch(config, batch_size: int = 8, length: int = 128) -> dict[str, torch.Tensor]:
    """Random token ids: enough to time a forward pass and compare two models' outputs."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or length
    length = min(length, limit)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch_size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def time_forward(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 5) -> float:
    """Median seconds of one forward pass on ``batch`` (after a warm-up pass)."""
    model.eval()
    model(**batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
