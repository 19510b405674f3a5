"""What each unit (a block, the embeddings, the head) is doing: the numbers the console plots.

Every ``stats_every`` steps the engine snapshots gradients and weights before
the optimizer step (``before_update``) and measures after it (``after_update``):
gradient norm, update ratio (how far the weights moved, relative to their size),
trainable share and sparsity per unit, and trainable/sparsity per tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .model import Units


def describe_units(units: Units, params: dict[str, torch.nn.Parameter]) -> list[dict[str, Any]]:
    """The units and their tensors, as the ``hello`` and ``policy`` events carry them."""
    return [
        {
            "name": u.name,
            "numel": u.numel,
            "params": [
                {"name": n, "numel": params[n].numel(), "shape": list(params[n].shape), "trainable": params[n].requires_grad}
                for n in u.params
            ],
        }
        for u in units
    ]


def trainable_by_unit(units: Units, params: dict[str, torch.nn.Parameter]) -> dict[str, float]:
    """Share of each unit's parameters that trains."""
    return {
        u.name: (sum(params[n].numel() for n in u.params if params[n].requires_grad) / u.numel if u.numel else 0.0)
        for u in units
    }


@torch.no_grad()
def before_update(units: Units, params: dict[str, torch.nn.Parameter]) -> dict[str, Any]:
    """Squared gradient norm per unit and a copy of every tensor (the update ratio measures real weight change)."""
    grad_sq: dict[str, float] = {}
    snapshot: dict[str, torch.Tensor] = {}
    for u in units:
        total = 0.0
        for n in u.params:
            p = params[n]
            if p.grad is not None:
                total += float(p.grad.float().pow(2).sum())
            snapshot[n] = p.detach().clone()
        grad_sq[u.name] = total
    return {"grad_sq": grad_sq, "snapshot": snapshot}


@torch.no_grad()
def after_update(units: Units, params: dict[str, torch.nn.Parameter], before: dict[str, Any]) -> dict[str, Any]:
    """The fields of a ``units`` event: per unit and per tensor, measured against ``before``."""
    per_unit: dict[str, dict[str, float]] = {}
    tensors: dict[str, dict[str, Any]] = {}
    snap = before["snapshot"]
    for u in units:
        upd, wsq, zeros, trainable_n = 0.0, 0.0, 0, 0
        for n in u.params:
            p = params[n]
            z = int((p == 0).sum())
            zeros += z
            tensors[n] = {"trainable": p.requires_grad, "sparsity": round(z / p.numel(), 5)}
            if p.requires_grad:
                trainable_n += p.numel()
            if n in snap:
                upd += float((p - snap[n]).float().pow(2).sum())
                wsq += float(snap[n].float().pow(2).sum())
        per_unit[u.name] = {
            "trainable": round(trainable_n / u.numel, 5),
            "grad_norm": math.sqrt(before["grad_sq"][u.name]),
            "update_ratio": math.sqrt(upd) / math.sqrt(wsq) if wsq > 0 else 0.0,
            "sparsity": round(zeros / u.numel, 5),
        }
    return {"units": per_unit, "tensors": tensors}
