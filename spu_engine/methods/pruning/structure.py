"""Structured pruning: whole attention heads and FFN neurons, the units ``spu export --compact`` removes.

With ``structure: heads_neurons`` a pruner's per-weight scores (|w| for
magnitude and IMP, learned scores for movement) are summed over each head
(its q, k, v rows and output-projection columns) and each FFN neuron (its
input rows and output column), and whole groups go, lowest mean score first,
until the target fraction of the grouped weights is pruned (block movement
pruning, Lagunas et al. 2021, with heads and neurons as the blocks).  Masks
stay per weight, so everything downstream (optimizer re-masking, sparsity
events, checkpoints, regrowth) is shared with unstructured pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from spu_engine.methods.pruning.layout import ffn_layers
from spu_engine.model.compact_heads import attention_layout, head_count
from spu_engine.model.loading import find_block_list


@dataclass(frozen=True)
class Slab:
    """Features ``f`` of a group family occupy ``[offset + f*size, offset + (f+1)*size)`` along ``axis`` of weight ``name``."""

    name: str
    axis: int
    offset: int
    size: int


@dataclass(frozen=True)
class Family:
    """``count`` groups of one kind (heads or neurons) in one block, laid out over some weights."""

    block: int
    kind: str
    count: int
    slabs: tuple[Slab, ...]

    def weights_per_group(self, shapes: dict[str, torch.Size]) -> int:
        return sum(shapes[s.name].numel() // shapes[s.name][s.axis] * s.size for s in self.slabs)


def _axis(module: nn.Module, side: str) -> int:
    """The weight axis of a layer's output ('out') or input ('in') features; Conv1D stores [in, out]."""
    if isinstance(module, Conv1D):
        return 1 if side == "out" else 0
    return 0 if side == "out" else 1


def families(model: nn.Module, targets: list[str]) -> list[Family]:
    """Heads and FFN neurons of every block whose weights are all among ``targets``."""
    prefix, blocks = find_block_list(model)
    chosen = set(targets)
    out: list[Family] = []
    for i, block in enumerate(blocks):
        base = f"{prefix}.{i}."
        layout = attention_layout(block)
        if layout is not None:
            attn_path, qkv, out_path, size_attr, _ = layout
            attn = block.get_submodule(attn_path)
            heads, size = head_count(block), getattr(attn, size_attr)
            slabs = []
            for n in qkv:
                module = getattr(attn, n)
                thirds = 3 if len(qkv) == 1 else 1  # fused q|k|v: the same heads in each third
                slabs += [
                    Slab(f"{base}{attn_path}.{n}.weight", _axis(module, "out"), t * heads * size, size)
                    for t in range(thirds)
                ]
            slabs.append(Slab(f"{base}{out_path}.weight", _axis(block.get_submodule(out_path), "in"), 0, size))
            if all(s.name in chosen for s in slabs):
                out.append(Family(i, "head", heads, tuple(slabs)))
        ffn = ffn_layers(block)
        if ffn is not None:
            ins, out_path = ffn
            slabs = [Slab(f"{base}{p}.weight", _axis(block.get_submodule(p), "out"), 0, 1) for p in ins]
            out_layer = block.get_submodule(out_path)
            slabs.append(Slab(f"{base}{out_path}.weight", _axis(out_layer, "in"), 0, 1))
            if all(s.name in chosen for s in slabs):
                out.append(Family(i, "neuron", out_layer.weight.shape[slabs[-1].axis], tuple(slabs)))
    return out


def group_scores(family: Family, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed score of each of the family's groups."""
    total = torch.zeros(family.count, dtype=torch.float64)
    for s in family.slabs:
        part = scores[s.name].narrow(s.axis, s.offset, family.count * s.size).movedim(s.axis, 0)
        total += part.reshape(family.count, -1).sum(dim=1).double().cpu()
    return total


def select_groups(
    fams: list[Family], scores: dict[str, torch.Tensor], sparsity: float, scope: str
) -> dict[str, torch.Tensor]:
    """Keep-masks removing whole groups, lowest mean score first, until ``sparsity`` of the grouped weights is gone.

    ``global`` ranks all groups of all blocks together; ``per_layer`` prunes every block to the same fraction
    (so every block keeps the same FFN width, which ``--compact`` turns into a stock config).
    """
    shapes = {n: s.shape for n, s in scores.items()}
    keep = {
        s.name: torch.ones(shapes[s.name], dtype=torch.bool, device=scores[s.name].device)
        for f in fams
        for s in f.slabs
    }
    pools = (
        [fams] if scope == "global" else [[f for f in fams if f.block == b] for b in sorted({f.block for f in fams})]
    )
    for pool in pools:
        means, sizes, owners = [], [], []
        for fi, f in enumerate(pool):
            per = f.weights_per_group(shapes)
            means.append(group_scores(f, scores) / per)
            sizes.append(torch.full((f.count,), per, dtype=torch.float64))
            owners += [(fi, g) for g in range(f.count)]
        mean, size = torch.cat(means), torch.cat(sizes)
        budget = sparsity * float(size.sum())
        order = torch.argsort(mean, stable=True)
        removed = torch.cumsum(size[order], 0)
        n_groups = int(torch.searchsorted(removed, torch.tensor([budget], dtype=torch.float64), right=True)[0])
        if (
            n_groups < len(order)
            and budget - (float(removed[n_groups - 1]) if n_groups else 0.0) > float(size[order[n_groups]]) / 2
        ):
            n_groups += 1  # the nearer of the two group boundaries around the target
        for idx in order[:n_groups].tolist():
            fi, g = owners[idx]
            for s in pool[fi].slabs:
                keep[s.name].narrow(s.axis, s.offset + g * s.size, s.size).fill_(False)
    return keep
