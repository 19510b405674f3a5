"""The machine beside the run: GPU, CPU, RAM and throughput, sampled every few seconds for the ``system`` event.

Nothing here runs per step but ``count`` (a sum over a CPU tensor the collate
just made) and ``stepped``: the device is never synchronised for a sample.
The rest is read once an interval (``every`` seconds): psutil for the
process and the machine, the torch allocator for this process's GPU memory
(its peak per interval: torch's counter is reset after each sample),
and NVML (``nvidia-ml-py``, optional) for utilisation and the device's memory
as ``nvidia-smi`` shows it.  A machine without a GPU reports no GPU field.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import psutil
import torch

from spu_engine.runtime.activation_meter import PEAKS


class SystemSampler:
    """Counts the samples and tokens of the batches trained; ``sample`` reads the machine and starts a new interval."""

    def __init__(self, devices: list[torch.device], every: float, world_size: int = 1) -> None:
        self.every = every
        self.world_size = world_size  # each rank trains its share of the global batch: rank 0's counts times this
        self.cuda = sorted(
            {d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda"}
        )
        self.nvml = bool(self.cuda) and importlib.util.find_spec("pynvml") is not None
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # the first reading of each measures from here
        psutil.cpu_percent(None)
        self._last = time.monotonic()
        self._step = [0, 0]  # samples, tokens of the step under way
        self._interval = [0, 0]
        self._train_seconds = 0.0

    def count(self, features: list[dict[str, Any]]) -> None:
        """The features of a batch that trains (its forward builds a graph): its samples and non-padding tokens,
        counted in Python before they become tensors (no tensor is read)."""
        self._step[0] += len(features)
        self._step[1] += sum(
            sum(f["attention_mask"]) if "attention_mask" in f else len(f["input_ids"]) for f in features
        )

    def stepped(self, seconds: float | None) -> None:
        """The step ended after ``seconds``; None: it did not count (skipped batch, out of memory), nor do its batches."""
        if seconds is not None:
            self._interval[0] += self._step[0]
            self._interval[1] += self._step[1]
            self._train_seconds += seconds
        self._step = [0, 0]

    def due(self) -> bool:
        return self.every > 0 and time.monotonic() - self._last >= self.every

    @property
    def has_steps(self) -> bool:
        """Steps trained since the last sample."""
        return self._train_seconds > 0

    def sample(self) -> dict[str, Any]:
        """The ``system`` event's fields now; the throughput is over the steps since the last sample."""
        fields: dict[str, Any] = {"seconds": round(self._train_seconds, 3)}
        if self._train_seconds > 0:
            fields["samples_per_s"] = round(self._interval[0] * self.world_size / self._train_seconds, 2)
            fields["tokens_per_s"] = round(self._interval[1] * self.world_size / self._train_seconds, 1)
        memory = psutil.virtual_memory()
        with self.process.oneshot():
            fields.update(
                cpu_process=round(self.process.cpu_percent(None), 1),
                rss=self.process.memory_info().rss,
            )
        fields.update(
            cpu_machine=round(psutil.cpu_percent(None), 1),
            cpu_count=psutil.cpu_count(),
            ram_used=memory.total - memory.available,
            ram_total=memory.total,
        )
        if self.cuda:
            fields["gpus"] = {str(i): self._gpu(i) for i in self.cuda}
        self._last = time.monotonic()
        self._interval = [0, 0]
        self._train_seconds = 0.0
        return fields

    def _gpu(self, index: int) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(index)
        stats: dict[str, Any] = {
            "name": props.name,
            "memory_total": props.total_memory,
            "allocated": torch.cuda.memory_allocated(index),
            "reserved": torch.cuda.memory_reserved(index),
            "max_allocated": PEAKS.window_peak(index),  # the peak since the last sample
        }
        if self.nvml:
            try:  # torch maps its index to NVML's (CUDA_VISIBLE_DEVICES)
                stats["utilization"] = float(torch.cuda.utilization(index))
                stats["memory_used"] = torch.cuda.device_memory_used(index)
            except Exception:
                self.nvml = False
                stats.pop("utilization", None)
        if "memory_used" not in stats:
            free, total = torch.cuda.mem_get_info(index)
            stats["memory_used"] = total - free
        return stats
