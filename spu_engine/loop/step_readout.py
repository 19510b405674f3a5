"""A step's loss and gradient norm, read on the host one step late, so a plain step never waits for the device.

The trainer leaves them on the device: the gradient norm is computed and clipped there, and a non-finite loss or
gradient skips the update there too (fused AdamW's ``found_inf``, as AMP's gradient scaler does it).  Their copy
to the host starts without blocking, and the step event is *held*: it goes out at the end of the next step, when
the device has long finished this one, or as soon as anything else is emitted (the emitter settles a held step
first, so events keep their order and an evaluation, a checkpoint or a change never overtakes the step before it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from spu_engine.model.sharded import local


@dataclass
class DeviceCheck:
    """What the device knows after backward: the loss, each gradient's norm (``names`` in the same order), their
    total and whether the update must be skipped (1.0: a non-finite loss or gradient)."""

    loss: torch.Tensor
    names: list[str]
    norms: torch.Tensor | None
    total: torch.Tensor | None
    found_inf: torch.Tensor


def check_gradients(
    loss: torch.Tensor,
    named: list[tuple[str, torch.nn.Parameter]],
    max_norm: float,
    clip: bool,
    over_shards: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> DeviceCheck:
    """Per-tensor and total norms of the gradients of ``named`` (tensors that have one), clipped to ``max_norm``
    when ``clip``; no host sync.  Sharded gradients (FSDP2) are measured on each rank's shard, the squares summed
    over the shards by ``over_shards`` in one collective, and clipped shard by shard with the same factor."""
    if not named:
        return DeviceCheck(loss, [], None, None, (~torch.isfinite(loss)).float())
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, p in named:
        by_dtype.setdefault(p.grad.dtype, []).append((name, local(p.grad)))
    names = [name for group in by_dtype.values() for name, _ in group]
    parts = [torch.stack(torch._foreach_norm([g for _, g in group])).float() for group in by_dtype.values()]
    norms = parts[0] if len(parts) == 1 else torch.cat(parts)
    if over_shards is not None:
        norms = over_shards(norms.square()).sqrt()
    total = torch.linalg.vector_norm(norms)
    if clip and over_shards is None:
        torch.nn.utils.clip_grads_with_norm_([p for _, p in named], max_norm, total)
    elif clip:  # clip_grads_with_norm_'s arithmetic, on the shards
        factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for group in by_dtype.values():
            torch._foreach_mul_([g for _, g in group], factor.to(group[0][1].dtype))
    return DeviceCheck(loss, names, norms, total, (~torch.isfinite(total + loss)).float())


@dataclass
class HeldStep:
    """A step event waiting for its loss and gradient norm to reach the host."""

    fields: dict[str, Any]
    began: float  # time.perf_counter() when the step began
    seconds: float
    check: DeviceCheck
    host: torch.Tensor  # loss, total norm, found_inf, copied without blocking
    ready: Any  # a CUDA event recorded after the copy; None on the CPU

    def values(self) -> tuple[float, float | None, bool]:
        if self.ready is not None:
            self.ready.synchronize()  # the copy started a step ago: long done, in practice no wait
        loss, total, found = self.host.tolist()  # reads the host buffer directly, no device op
        return loss, (total if self.check.total is not None else None), bool(found)


def hold(fields: dict[str, Any], began: float, seconds: float, check: DeviceCheck) -> HeldStep:
    """Start the copy of the step's scalars to the host; the event waits in the returned ``HeldStep``."""
    total = check.total if check.total is not None else torch.zeros_like(check.found_inf)
    scalars = torch.stack([check.loss.float(), total.float(), check.found_inf])
    if scalars.device.type != "cuda":
        return HeldStep(fields, began, seconds, check, scalars, None)
    host = torch.empty(3, dtype=torch.float32, pin_memory=True)
    host.copy_(scalars, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return HeldStep(fields, began, seconds, check, host, ready)


class StepReadout:
    """The one held step, settled in order: by the next step, before any other event, or when asked."""

    def __init__(self, publish: Callable[[HeldStep], None]) -> None:
        self.publish = publish  # emits the step event (and what a non-finite step must say)
        self.held: HeldStep | None = None

    def hold(self, step: HeldStep) -> None:
        self.settle()
        self.held = step

    def settle(self) -> None:
        held, self.held = self.held, None
        if held is not None:
            self.publish(held)

    def non_finite_names(self, held: HeldStep) -> list[str]:
        """The tensors whose gradient was not finite in ``held`` (a sync: only said on a fault)."""
        if held.check.norms is None:
            return []
        finite = torch.isfinite(held.check.norms).tolist()
        return [name for name, ok in zip(held.check.names, finite) if not ok]
