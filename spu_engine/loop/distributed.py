"""Multi-process training (torchrun / accelerate launch): one policy, applied on one step everywhere.

Rank 0 owns the socket, the run folder and the command inbox.  At every step
boundary it broadcasts the commands it took (and any stop signal) to all ranks,
so each rank applies the same changes at the same step.  The model is sharded
with FSDP2 (``loop.sharding``), which reduces gradients during backward and
follows live freezing: ``requires_grad`` changes only at step boundaries, when
every parameter is sharded.  (DistributedDataParallel cannot: its buckets are
fixed when it wraps the model, and its reducer waits for gradients a frozen
tensor never gets.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    _mesh: tuple[str, DeviceMesh] | None = None

    @classmethod
    def from_env(cls) -> Distributed | None:
        """Join the process group torchrun / accelerate set up in the environment; None for a process started alone
        (one started by a launcher, even a world of one, is sharded: the same path as on many GPUs)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 and "LOCAL_RANK" not in os.environ:
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

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a per-rank scalar over the ranks, on the device (no host sync under NCCL)."""
        total = value.detach().float().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def sum_over_shards(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks that hold different shards of the model (all of them, or under
        ``hybrid_shard`` the ranks of one node: the other nodes hold copies); in place, on the device."""
        group = self._mesh[1]["shard"].get_group() if self._mesh is not None else None
        dist.all_reduce(value, group=group)
        return value

    def mesh(self, sharding: str) -> DeviceMesh:
        """The device mesh FSDP2 shards over: every rank in one dimension, or for ``hybrid_shard`` nodes x the ranks of
        a node (replicated across nodes, sharded within one).  With gloo the mesh is a CPU one even where CUDA is."""
        if self._mesh is None or self._mesh[0] != sharding:
            kind = "cuda" if self.device.type == "cuda" else "cpu"
            if sharding == "hybrid_shard":
                local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
                if local <= 0 or self.world_size % local:
                    raise ValueError(
                        f"sharding: hybrid_shard needs the world size ({self.world_size}) to be a multiple of the ranks "
                        f"per node (LOCAL_WORLD_SIZE={local})"
                    )
                mesh = init_device_mesh(kind, (self.world_size // local, local), mesh_dim_names=("replicate", "shard"))
            else:
                mesh = init_device_mesh(kind, (self.world_size,), mesh_dim_names=("shard",))
            self._mesh = (sharding, mesh)
        return self._mesh[1]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
