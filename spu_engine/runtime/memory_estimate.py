"""What a policy costs in device memory, so the what-if can say it before a change is made.

A step holds the weights (every parameter and buffer, with the tensors a method would add), a gradient for each
tensor that trains, the optimizer's state and the activations the backward needs.  The first three are counted
from the tensors, by dtype: a tensor that exists is counted as it is, one a method would add (or reshape, a LoRA
rank) as its element count in the model's main dtype.  AdamW's state exists only for tensors that have trained
(a frozen one keeps what it had): a tensor with state is counted as it is; one that would start training gets two
moments like itself, plus the 4-byte step count that torch keeps on the CPU (so device memory only on a CPU run).
Activations come from a measured step (``activation_meter``), scaled by the share of the blocks a backward would
run through (a frozen prefix keeps none) and of the samples it would take; where no block trained when measured,
each block is estimated from the model's shape and the measured batch (Korthikanti et al. 2022: s*b*h*(34 +
5*a*s/h) bytes at 16 bits, or its input alone with gradient checkpointing).  What is available: on CUDA the
driver's free memory plus what this process's allocator holds; elsewhere the machine's available RAM plus the
weights and state the run holds now.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import psutil
import torch

from spu_engine.core.policy import Policy
from spu_engine.model.loading import Units
from spu_engine.model.sharded import local
from spu_engine.runtime.activation_meter import ActivationMeter
from spu_engine.runtime.selection import backward_depth

SHORT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
STEP_COUNT_BYTES = 4  # AdamW's per-tensor step count, a float32 scalar on the CPU (torch, unless fused/capturable)


class MemoryHost(Protocol):
    """What the estimate reads of the policy runtime."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    config: Any
    params: dict[str, torch.nn.Parameter]
    units: Units
    methods: list
    current: Policy

    def names_under(self, policy: Policy) -> list[str]: ...
    def trainable_mask(self, policy: Policy | None = None, names: list[str] | None = None) -> dict[str, bool]: ...
    def backward_keep(self, policy: Policy) -> float | None: ...


def dtype_name(dtype: torch.dtype) -> str:
    return SHORT_DTYPES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass
class Figures:
    """Bytes one training step would hold, each kind by dtype name; activations None: not measured yet."""

    weights: Counter
    gradients: Counter
    optimizer: Counter
    activations: int | None

    @property
    def resident(self) -> int:
        """What stays allocated between steps: weights, buffers and optimizer state."""
        return sum(self.weights.values()) + sum(self.optimizer.values())

    @property
    def total(self) -> int:
        return self.resident + sum(self.gradients.values()) + (self.activations or 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self.weights),
            "gradients": dict(self.gradients),
            "optimizer": dict(self.optimizer),
            "activations": self.activations,
            "total": self.total,
        }


class MemoryEstimate:
    """The device memory of the policy in force and of another one, from the tensors and a measured step."""

    def __init__(self, host: MemoryHost) -> None:
        self.host = host
        self.meter = ActivationMeter(host.model)
        self._measured_under: Policy | None = None
        self._measured_memory = host.current.memory  # the memory settings the measured step ran under

    @property
    def device(self) -> torch.device:
        return next(self.host.model.parameters()).device

    def measuring(self, step: int, due: bool) -> AbstractContextManager[None]:
        """Around the forward and backward of step ``step`` (counted as its ``step`` event counts it): measured when
        ``due``, when nothing was measured yet, or when the policy changed since the last measurement."""
        host = self.host
        if not due and self.meter.latest is not None and self._measured_under is host.current:
            return nullcontext()
        self._measured_under = host.current
        self._measured_memory = host.current.memory
        depth = backward_depth({n: p.requires_grad for n, p in host.params.items()}, host.units)
        return self.meter.measuring(step, depth, host.backward_keep(host.current), self.device)

    def what_if(self, before: Policy, after: Policy) -> dict[str, Any]:
        """Before -> after as the ``preview`` event carries it (``protocol.events.MemoryPreview``)."""
        now, then = self.figures(before), self.figures(after)
        cuda = self.device.type == "cuda"
        available = self.available(now)
        measured = self.meter.latest
        return {
            "where": "device" if cuda else "RAM",
            "before": now.as_dict(),
            "after": then.as_dict(),
            "available": available,
            "fits": then.total <= available,
            "optimizer": type(self.host.optimizer).__name__ if self.host.optimizer is not None else None,
            "measured_step": measured.step if measured else None,
            "checkpointing": after.memory.gradient_checkpointing,
        }

    def figures(self, policy: Policy) -> Figures:
        """What a step would hold under ``policy``."""
        host = self.host
        names = host.names_under(policy)
        added: dict[str, int] = {}
        for m in host.methods:
            added.update(m.added_under(policy))
        mask = host.trainable_mask(policy, names)
        kept = {n for m in host.methods for n in m.keeps_frozen_state(policy)}  # others' state goes when frozen
        main = self.main_dtype()
        step_count = STEP_COUNT_BYTES if self.device.type == "cpu" else 0
        weights, gradients, optimizer = Counter(), Counter(), Counter()
        for n in names:
            p = host.params.get(n)
            exists = p is not None and added.get(n, p.numel()) == p.numel()
            if not exists and n not in added:
                continue
            dtype = dtype_name(p.dtype if exists else main)
            size = local(p).nbytes if exists else added[n] * main.itemsize  # sharded: this rank's part
            weights[dtype] += size
            state = self.optimizer_state(p) if exists and (mask.get(n) or n in kept) else []
            for t in state:
                optimizer[dtype_name(t.dtype)] += local(t).nbytes
            if mask.get(n):
                gradients[dtype] += size
                if not state:  # starts training: its moments are made at its first step
                    optimizer[dtype] += 2 * size
                    optimizer["fp32"] += step_count
        for b in host.model.buffers():
            weights[dtype_name(b.dtype)] += b.nbytes
        return Figures(weights, gradients, optimizer, self.activations(policy, mask))

    def optimizer_state(self, p: torch.nn.Parameter) -> list[torch.Tensor]:
        """The state tensors of ``p`` on its own device (torch keeps AdamW's step count on the CPU for CUDA tensors)."""
        optimizer = self.host.optimizer
        state = optimizer.state.get(p) if optimizer is not None else None
        return [t for t in list((state or {}).values()) if isinstance(t, torch.Tensor) and t.device == p.device]

    def main_dtype(self) -> torch.dtype:
        """The dtype most parameter entries have: the one a method's new tensors take."""
        counts: Counter = Counter()
        for p in self.host.params.values():
            counts[p.dtype] += p.numel()
        return counts.most_common(1)[0][0]

    def activations(self, policy: Policy, mask: dict[str, bool]) -> int | None:
        """The latest measurement scaled to ``policy``: by the blocks a backward would run through and the samples
        it would take; a block nobody measured is estimated from the model's shape."""
        if not any(mask.values()):
            return 0
        measured = self.meter.latest
        if measured is None:
            return None
        depth, keep = backward_depth(mask, self.host.units), self.host.backward_keep(policy)
        samples = keep / measured.keep if keep is not None and measured.keep else 1.0
        was, then = self._measured_memory, policy.memory
        # the whole batch's: saved tensors count every micro-batch's, the CUDA peak one micro-batch's; then held for
        # one micro-batch of the new split at a time, stored whole or recomputed as the new setting says
        whole = measured.bytes * (1 if measured.how == "saved tensors" else was.grad_accum)
        block_was = self.block_activations(measured.batch, was.gradient_checkpointing) * was.grad_accum
        block_then = self.block_activations(measured.batch, then.gradient_checkpointing) * was.grad_accum
        blocks = self.host.units.num_blocks
        in_blocks = min(whole, round(measured.depth * blocks * block_was))  # the rest (embeddings, head) stays
        per_depth = in_blocks / measured.depth if measured.depth > 0 else blocks * block_was
        stored = per_depth * (block_then / block_was if block_was else 1.0)
        return round(((whole - in_blocks) + depth * stored) * samples / then.grad_accum)

    def block_activations(self, batch: tuple[int, int] | None, checkpointed: bool) -> int:
        """One block's activations for the measured batch (samples, tokens each), from the model's shape (0 where
        its config does not say); with checkpointing, only its input is kept (the rest is recomputed in backward)."""
        config = getattr(self.host.model, "config", None)
        hidden = getattr(config, "hidden_size", None)
        heads = getattr(config, "num_attention_heads", None)
        if not (hidden and heads and batch):
            return 0
        (samples, length), itemsize = batch, self.main_dtype().itemsize
        if checkpointed:
            return samples * length * hidden * itemsize
        return round(samples * length * hidden * (34 + 5 * heads * length / hidden) * itemsize / 2)

    def available(self, now: Figures) -> int:
        """Bytes this run may use: free memory plus what it holds now."""
        device = self.device
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            free, _total = torch.cuda.mem_get_info(index)
            return free + torch.cuda.memory_reserved(index)
        return psutil.virtual_memory().available + now.resident
