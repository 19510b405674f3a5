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

from spu_engine.model.loading import Units
from spu_engine.model.sharded import is_distributed, local


def describe_units(units: Units, params: dict[str, torch.nn.Parameter]) -> list[dict[str, Any]]:
    """The units and their tensors, as the ``hello`` and ``policy`` events carry them."""
    return [
        {
            "name": u.name,
            "numel": u.numel,
            "params": [
                {
                    "name": n,
                    "numel": params[n].numel(),
                    "shape": list(params[n].shape),
                    "trainable": params[n].requires_grad,
                }
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
def grad_norms_by_unit(units: Units, params: dict[str, torch.nn.Parameter]) -> dict[str, float]:
    """The gradient norm of each unit that has a gradient now (automatic freezing's AutoFreeze criterion)."""
    grads = [(n, p.grad) for n, p in params.items() if p.grad is not None]
    grad_sq = dict(zip((n for n, _ in grads), sums_of_squares([g for _, g in grads])))
    return {
        u.name: math.sqrt(sum(grad_sq[n] for n in u.params if n in grad_sq))
        for u in units
        if any(n in grad_sq for n in u.params)
    }


@torch.no_grad()
def before_update(units: Units, params: dict[str, torch.nn.Parameter]) -> dict[str, Any]:
    """Before the optimizer step: squared gradient norm per unit, squared weight norm per tensor, and a copy of each
    tensor the step can move (one with a gradient or that trains: a frozen one gets no update, and pruning re-applies
    masks only to trainable weights).  Norms without full-size temporaries, read back in one transfer each."""
    grads = [(n, p.grad) for n, p in params.items() if p.grad is not None]
    grad_sq = dict(zip((n for n, _ in grads), sums_of_squares([g for _, g in grads])))
    weight_sq = dict(zip(params, sums_of_squares(list(params.values()))))
    snapshot = {n: p.detach().clone() for n, p in params.items() if p.grad is not None or p.requires_grad}
    unit_grad_sq = {u.name: sum(grad_sq.get(n, 0.0) for n in u.params) for u in units}
    return {"grad_sq": unit_grad_sq, "weight_sq": weight_sq, "snapshot": snapshot}


@torch.no_grad()
def after_update(units: Units, params: dict[str, torch.nn.Parameter], before: dict[str, Any]) -> dict[str, Any]:
    """The fields of a ``units`` event: per unit and per tensor, measured against ``before``."""
    snap, weight_sq = before["snapshot"], before["weight_sq"]
    moved = [n for n in snap if n in params]
    upd_sq = dict(zip(moved, sums_of_squares([params[n] for n in moved], minus=[snap[n] for n in moved])))
    names = list(params)
    nonzero = _over_shards(torch.stack([torch.count_nonzero(local(p)) for p in params.values()]), params.values())
    nonzero = nonzero.tolist() if names else []
    zeros_of = {n: params[n].numel() - nz for n, nz in zip(names, nonzero)}
    per_unit: dict[str, dict[str, float]] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for u in units:
        upd, wsq, zeros, trainable_n = 0.0, 0.0, 0, 0
        for n in u.params:
            p = params[n]
            zeros += zeros_of[n]
            tensors[n] = {"trainable": p.requires_grad, "sparsity": round(zeros_of[n] / p.numel(), 5)}
            if p.requires_grad:
                trainable_n += p.numel()
            if n in weight_sq:  # tensors that existed before the step (every one, unless a hook added some)
                upd += upd_sq.get(n, 0.0)  # a tensor with no copy could not move
                wsq += weight_sq[n]
        per_unit[u.name] = {
            "trainable": round(trainable_n / u.numel, 5),
            "grad_norm": math.sqrt(before["grad_sq"].get(u.name, 0.0)),
            "update_ratio": math.sqrt(upd) / math.sqrt(wsq) if wsq > 0 else 0.0,
            "sparsity": round(zeros / u.numel, 5),
        }
    return {"units": per_unit, "tensors": tensors}


_STATS_CHUNK = 1 << 20  # elements: a 4 MiB float32 scratch piece


def _over_shards(values: torch.Tensor, tensors) -> torch.Tensor:
    """Per-shard sums, summed over the ranks holding the other shards when the tensors are sharded (FSDP2)."""
    first = next(iter(tensors), None)
    if first is not None and is_distributed(first):
        torch.distributed.all_reduce(values, group=first.device_mesh.get_group(first.device_mesh.ndim - 1))
    return values


def sums_of_squares(tensors: list[torch.Tensor], minus: list[torch.Tensor] | None = None) -> list[float]:
    """sum(t ** 2) of each tensor (of ``t - minus[i]`` when given), as ``t.float().pow(2).sum()`` computes it, without
    its full-size temporaries: piece by piece through one small scratch buffer (which stays in cache on a CPU),
    read back to the host in one transfer.  (``torch.linalg.vector_norm`` is off by ~8e-4 on 12 M CPU elements.)
    Sharded tensors are summed on each rank's shard, then over the ranks in one collective."""
    shards = tensors
    tensors = [local(t) for t in tensors]
    minus = [local(t) for t in minus] if minus is not None else None
    partial: list[torch.Tensor] = []
    owner: list[int] = []
    scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    for i, t in enumerate(tensors):
        flat = t.detach().reshape(-1)
        other = minus[i].detach().reshape(-1) if minus is not None else None
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        chunk = _STATS_CHUNK if t.device.type == "cpu" else 16 * _STATS_CHUNK
        buf = scratch.get((t.device, dtype))
        if buf is None or buf.numel() < min(chunk, flat.numel()):
            buf = scratch[(t.device, dtype)] = torch.empty(
                min(chunk, max(x.numel() for x in tensors)), device=t.device, dtype=dtype
            )
        for start in range(0, flat.numel(), chunk):
            piece = flat[start : start + chunk]
            b = buf[: piece.numel()]
            if other is None:
                b.copy_(piece)
            else:
                torch.sub(piece, other[start : start + chunk], out=b)
            partial.append(b.mul_(b).sum())
            owner.append(i)
    sums = [0.0] * len(tensors)
    if partial:
        per_tensor = torch.zeros(len(tensors), device=partial[0].device, dtype=torch.float64)
        per_tensor.index_add_(0, torch.tensor(owner, device=per_tensor.device), torch.stack(partial).double())
        sums = _over_shards(per_tensor, shards).tolist()
    return sums
