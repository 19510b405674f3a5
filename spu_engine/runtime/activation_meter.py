"""The activation memory of a real training step, measured so a what-if can scale it to another policy.

A step's weights, gradients and optimizer state can be counted from the tensors, but its activations depend on the
model, the batch and the kernels, so they are measured on a step the trainer marks (the first one, the first after
each change, and every ``stats_every``-th).  On CUDA the allocator says it: the step's peak allocated minus what was
allocated when it began minus the gradients it made (so weights + optimizer state + gradients + activations is the
measured peak).  Elsewhere the forward's saved tensors are counted as autograd packs them (``saved_tensors_hooks``),
each storage once, parameters and buffers left out.  Neither synchronises the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from spu_engine.model.sharded import local


class DevicePeaks:
    """torch's peak-allocated counter, shared by two readers: the ``system`` event's peak per window and a measured
    step's own peak.  A measured step resets the counter; what it had counted is kept for the window."""

    def __init__(self) -> None:
        self.window: dict[int, int] = {}  # device index -> the highest peak seen before a reset inside this window

    def begin_step(self, index: int) -> None:
        self.window[index] = max(self.window.get(index, 0), torch.cuda.max_memory_allocated(index))
        torch.cuda.reset_peak_memory_stats(index)

    def window_peak(self, index: int) -> int:
        """The peak since the last call, and a new window from now."""
        peak = max(self.window.pop(index, 0), torch.cuda.max_memory_allocated(index))
        torch.cuda.reset_peak_memory_stats(index)
        return peak


PEAKS = DevicePeaks()  # torch keeps one counter per device and process, so one reader object per process


@dataclass(frozen=True)
class Measurement:
    """The activations of one step and what they were measured under, to scale them to another policy."""

    step: int
    bytes: int
    depth: float  # the share of the blocks a backward ran through (runtime.selection.backward_depth)
    keep: float | None  # the share of the samples backpropagated (None: it depended on the losses)
    how: str  # "peak" (CUDA allocator) or "saved tensors"
    batch: tuple[int, int] | None  # samples and tokens each of the forward that built the graph


@dataclass
class Found:
    bytes: int = 0


class ActivationMeter:
    """Measures the steps it is asked to and keeps the latest ``Measurement``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.latest: Measurement | None = None

    @contextmanager
    def measuring(self, step: int, depth: float, keep: float | None, device: torch.device) -> Iterator[None]:
        """Around one step's forward and backward on ``device``; kept only when the step's backward ended."""
        batch: list[tuple[int, int]] = []

        def seen(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if torch.is_grad_enabled() and isinstance(ids, torch.Tensor) and ids.dim() == 2:
                batch[:] = [(ids.shape[0], ids.shape[1])]

        cuda = device.type == "cuda"
        handle = self.model.register_forward_pre_hook(seen, with_kwargs=True)
        try:
            with self._peak(device) if cuda else self._saved() as found:
                yield
        finally:
            handle.remove()
        how = "peak" if cuda else "saved tensors"
        self.latest = Measurement(step, found.bytes, depth, keep, how, batch[0] if batch else None)

    @contextmanager
    def _peak(self, device: torch.device) -> Iterator[Found]:
        """The CUDA allocator's peak during the step, less what it began with and the gradients it made."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        PEAKS.begin_step(index)
        start, found = torch.cuda.memory_allocated(index), Found()
        yield found
        grads = sum(p.grad.nbytes for p in self.model.parameters() if p.grad is not None)
        found.bytes = max(0, torch.cuda.max_memory_allocated(index) - start - grads)

    @contextmanager
    def _saved(self) -> Iterator[Found]:
        """The bytes of the tensors autograd saved for backward, each storage once, the model's own left out."""
        owned = {local(t).untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}
        saved: dict[int, int] = {}
        found = Found()

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse or nested: uncounted rather than a failed step
                return tensor
            if storage.data_ptr() not in owned:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield found
        found.bytes = sum(saved.values())
