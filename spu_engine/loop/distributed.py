"""Multi-process training (torchrun / accelerate launch): one policy, applied on one step everywhere.

Rank 0 owns the socket, the run folder and the command inbox.  At every step
boundary it broadcasts the commands it took (and any stop signal) to all ranks,
so each rank applies the same changes at the same step.  Gradients are averaged
by an explicit all-reduce over the tensors that are trainable *now* rather than
by DistributedDataParallel, whose buckets are fixed when it wraps the model and
so cannot follow live freezing, unfreezing or adapters added mid-run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @classmethod
    def from_env(cls) -> Distributed | None:
        """Join the process group torchrun / accelerate set up in the environment; None when alone."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device, backend = torch.device("cuda", local), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        return cls(rank=rank, world_size=world, local_rank=local, device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (small picklable objects: commands, signals, metrics)."""
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's share of a global batch drawn identically on every rank."""
        return indices[self.rank :: self.world_size]

    def gather_shards(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's per-sample ``values`` for its ``shard`` of a global batch, in the global batch's order."""
        parts = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(parts, values.contiguous())
        out = torch.empty(values.numel() * self.world_size, dtype=values.dtype, device=values.device)
        for rank, part in enumerate(parts):
            out[rank :: self.world_size] = part
        return out

    def average_gradients(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Mean gradient and mean loss over ranks; a rank that kept no sample contributes zeros.

        When no rank has any gradient (selective backprop kept no sample anywhere), every
        gradient stays empty: AdamW would otherwise still move the weights (decay, momentum).
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has_grad = float(any(p.grad is not None for p in params))
        tail = torch.tensor([float(loss), has_grad], device=self.device)
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [tail])
        dist.all_reduce(flat)
        flat /= self.world_size
        if flat[-1] == 0:
            return flat[-2]
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
        return flat[-2]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
