"""Many ranks, one run: after every change, each rank's view of what trains and of its masks, gathered and compared.

Every rank applies the same commands and timeline entries at the same step, and decides LISA, AutoFreeze and the
pruning masks from the same numbers; a bug that let one rank drift (a different trainable set, another mask) would
not fail: it would train a model no single process would, silently.  So after each change every rank sends a
digest (its trainable tensors, the policy in force, and for each mask the fingerprint of the whole mask it decided
and whether its own shard still holds it), and a difference stops the run after a checkpoint, naming the tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from spu_engine.loop.distributed import Distributed
from spu_engine.runtime.policy_runtime import PolicyRuntime


def rank_digest(runtime: PolicyRuntime) -> dict[str, Any]:
    """What this rank trains, under which policy, with which masks."""
    masks: dict[str, Any] = {}
    for m in runtime.methods:
        masks.update(m.mask_fingerprints())
    policy = runtime.current.model_dump_json().encode()
    return {
        "trainable": sorted(n for n, p in runtime.params.items() if p.requires_grad),
        "policy": hashlib.sha256(policy).hexdigest(),
        "masks": masks,
    }


def first_difference(digests: list[dict[str, Any]]) -> str | None:
    """Where the ranks' digests part (rank 0 is the reference), in words; None when they agree."""
    ref = digests[0]
    for rank, other in enumerate(digests[1:], start=1):
        if other["policy"] != ref["policy"]:
            return f"rank {rank} has another policy in force than rank 0"
        if other["trainable"] != ref["trainable"]:
            only = sorted(set(other["trainable"]) ^ set(ref["trainable"]))
            return f"{only[0]} trains on {'rank ' + str(rank) if only[0] in other['trainable'] else 'rank 0'} only"
        if set(other["masks"]) != set(ref["masks"]):
            name = sorted(set(other["masks"]) ^ set(ref["masks"]))[0]
            return f"the pruning mask of {name} exists on {'rank ' + str(rank) if name in other['masks'] else 'rank 0'} only"
        for name, (decided, _) in ref["masks"].items():
            if other["masks"][name][0] != decided:
                return f"the pruning mask of {name} was decided differently on rank {rank} than on rank 0"
    for rank, digest in enumerate(digests):
        changed = sorted(name for name, (_, held) in digest["masks"].items() if not held)
        if changed:
            return f"the pruning mask of {changed[0]} on rank {rank} is no longer the one every rank decided"
    return None


def compare_ranks(runtime: PolicyRuntime) -> str | None:
    """Every rank's digest, gathered (a collective all ranks enter at the same boundary) and compared."""
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, rank_digest(runtime))
    return first_difference(digests)


def watch_ranks(runtime: PolicyRuntime, ranks: Distributed, fault: Callable[[str], None]) -> None:
    """Compare the ranks after each change the runtime applies; ``fault`` stops the run on a difference."""
    applied = runtime.hooks.applied

    def applied_and_compared(*args: Any) -> None:
        applied(*args)
        problem = compare_ranks(runtime)
        if problem is not None:
            fault(
                f"the {ranks.world_size} ranks no longer train the same model: {problem}; stopping after a "
                "checkpoint rather than diverge silently"
            )

    runtime.hooks.applied = applied_and_compared
