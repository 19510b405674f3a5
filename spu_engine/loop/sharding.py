"""FSDP2 over the ranks: each transformer block its own unit, then the root (embeddings, head, what is left).

``fully_shard`` turns every parameter into a DTensor sharded on dim 0 over the mesh; forward gathers a block's
weights just before it runs, backward reduce-scatters its gradients as soon as they exist (overlapping the blocks
still to go), and the optimizer steps on the shards.  A unit may mix frozen and trainable tensors, and
``requires_grad`` may change between steps: FSDP2 reads it at every backward.  What it cannot follow is a tensor
added after sharding, so the tensors a policy's timeline adds are planned before (each method's ``plan``).

Mixed precision is FSDP2's own: the shards stay fp32 (the master weights the optimizer steps), a block's weights are
gathered in the compute dtype, and gradients are reduced in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from spu_engine.core.policy import Change, Policy, TimelineEntry
from spu_engine.loop.distributed import Distributed
from spu_engine.model.loading import Units, find_units
from spu_engine.runtime.policy_runtime import PolicyRuntime


def shard_model(
    model: nn.Module, units: Units, dist: Distributed, sharding: str, compute_dtype: torch.dtype | None
) -> None:
    """Shard ``model`` in place: ``fully_shard`` on each block of ``units`` (in model order), then on the root."""
    mesh = dist.mesh(sharding)
    policy = (
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        if compute_dtype is not None
        else MixedPrecisionPolicy()
    )
    reshard = sharding != "shard_grad_op"
    for index in range(units.num_blocks):
        block = model.get_submodule(f"{units.block_prefix}.{index}")
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    # the root (embeddings, head) is needed first in backward: kept gathered, as FSDP2's default for a root does
    # (resharding it cost a second all-gather of the embeddings each step: 8 % of a MiniLM step on 2 CPU ranks)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)


def follow_trainable(model: nn.Module) -> None:
    """After ``requires_grad`` changed: each FSDP unit re-reads which of its tensors train.  FSDP2 sets a unit's
    gradient-reduction dtype from its trainable tensors at the first forward only; a unit that was wholly frozen then
    reduces an unfrozen tensor's bf16 gradients into its fp32 gradient and fails (the mixed-precision unfreeze bug,
    pytorch#186998, still in torch 2.13).  ``_init_mp_dtypes`` is the idempotent step FSDP2's lazy init runs."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                group._init_mp_dtypes()


def rebind_optimizer(optimizer: torch.optim.Optimizer, before: dict[int, str], model: nn.Module) -> None:
    """Point the optimizer's groups at the sharded parameters that replaced the ones they held (``before``: id of
    each old parameter -> its name); called before any step, so there is no state to carry over."""
    now = dict(model.named_parameters(remove_duplicate=False))
    for group in optimizer.param_groups:
        group["params"] = [now[before[id(p)]] for p in group["params"]]
    optimizer.state.clear()


def reached_policies(policy: Policy, timeline: list[TimelineEntry]) -> list[Policy]:
    """The sections in force at step 0, then after each step entry of ``timeline`` in order, then each trigger's
    change on top of step 0's: every configuration a run of this policy can reach without a live change."""
    reached = [policy]
    current = policy
    for entry in sorted((e for e in timeline if not e.is_trigger), key=lambda e: e.step):
        current = current.apply(Change(freeze=entry.freeze, set=entry.set))
        reached.append(current)
    reached += [policy.apply(Change(freeze=t.freeze, set=t.set)) for t in timeline if t.is_trigger]
    return reached


def shard_runtime(
    runtime: PolicyRuntime,
    dist: Distributed,
    sharding: str,
    compute_dtype: torch.dtype | None,
    plan_peft: str | None = None,
) -> None:
    """Plan the tensors the policy's timeline adds, shard the model, and point the runtime and its optimizer at the
    sharded parameters; before the methods configure, so what they build (masks, scores) takes the shards' layout."""
    reached = reached_policies(runtime.current, runtime.pending + runtime.triggers)
    if plan_peft is not None:  # --plan-peft: a live switch from the console, with the policy's peft settings
        reached.append(runtime.current.apply(Change(set={"peft": {"method": plan_peft}})))
    for method in runtime.methods:
        method.plan(reached)
    named = dict(runtime.model.named_parameters(remove_duplicate=False))
    before = {id(p): n for n, p in named.items()}
    shard_model(runtime.model, runtime.units, dist, sharding, compute_dtype)
    if runtime.optimizer is not None:
        rebind_optimizer(runtime.optimizer, before, runtime.model)
    runtime.refresh_parameters()
    hooks = runtime.hooks
    taken = hooks.taken

    def taken_and_followed(before: set[str] | None) -> None:
        follow_trainable(runtime.model)
        taken(before)

    hooks.taken = taken_and_followed
    hooks.initial_model = sharded_teacher(hooks.initial_model, dist, sharding, compute_dtype)
    hooks.load_teacher = sharded_teacher(hooks.load_teacher, dist, sharding, compute_dtype)


def sharded_teacher(
    load: Callable[..., nn.Module], dist: Distributed, sharding: str, compute_dtype: torch.dtype | None
) -> Callable[..., nn.Module]:
    """``load``, its model sharded like the student: a distillation teacher takes its share of memory on each rank
    too (every rank loads it at the same boundary, and runs its forward with the student's)."""

    def load_sharded(*args: Any) -> nn.Module:
        teacher = load(*args).to(dist.device)
        shard_model(teacher, find_units(teacher), dist, sharding, compute_dtype)
        return teacher

    return load_sharded
