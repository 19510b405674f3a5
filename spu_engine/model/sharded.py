"""What a tensor holds on this rank: its shard when FSDP2 made it a DTensor, else itself."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank stores (a view: writing to it writes the tensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in full on every rank (gathered from the shards of a DTensor; a collective every rank enters)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def is_distributed(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def laid_out_like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole, the same on every rank) laid out as ``reference``: this rank's shard of it when
    ``reference`` is a DTensor (sliced here, no communication), else itself."""
    if not isinstance(reference, DTensor) or isinstance(tensor, DTensor):
        return tensor
    return distribute_tensor(tensor, reference.device_mesh, reference.placements, src_data_rank=None)
