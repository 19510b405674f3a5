"""The machine beside the run: GPU, CPU, RAM and throughput, sampled every few seconds for the ``system`` event.

Nothing here runs per step but ``count`` (a sum over a CPU tensor the collate
just made) and ``stepped``: the device is never synchronised for a sample.
The rest is read once an interval (``every`` seconds): psutil for the
process and the machine, the torch allocator for this process's GPU memory
(its peak per interval: torch's counter is reset after each sample),
and NVML (``nvidia-ml-py``, optional) for utilisation and the device's memory
as ``nvidia-smi`` shows it.  A machine without a GPU reports no GPU field.

Under torchrun every rank keeps a sampler and reads its own throughput and
memory (``ranks``), so a slow or full rank shows.  Gathering them is a
collective every rank must enter at the same step, and the ranks' clocks
differ: rank 0 alone decides (``proposal``), its word rides the broadcast of
each step boundary (``commands.Commands.take``) and ``agree`` makes it every
rank's ``due``.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch

from spu_engine.runtime.activation_meter import PEAKS

try:
    import resource  # the process's peak RSS; not on Windows
except ImportError:  # pragma: no cover
    resource = None  # type: ignore[assignment]

GIB = 2**30
Gather = Callable[[dict[str, Any]], list[dict[str, Any]]]  # this rank's reading -> every rank's, on rank 0 at least


class SystemSampler:
    """Counts the samples and tokens of the batches trained; ``sample`` reads the machine and starts a new interval."""

    def __init__(
        self,
        devices: list[torch.device],
        every: float,
        world_size: int = 1,
        rank: int = 0,
        gather: Gather | None = None,
    ) -> None:
        self.every = every
        self.world_size = world_size  # each rank trains its share of the global batch: rank 0's counts times this
        self.rank = rank
        self.gather: Gather = gather or (all_gather if world_size > 1 else lambda reading: [reading])
        self._agreed = False  # rank 0's decision, as the last boundary's broadcast carried it
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

    def ripe(self) -> bool:
        """The interval has passed on this process's clock."""
        return self.every > 0 and time.monotonic() - self._last >= self.every

    def due(self) -> bool:
        """Sample after this step: alone, by this clock; with several ranks, as rank 0 decided at the boundary."""
        return self.ripe() if self.world_size == 1 else self._agreed

    def proposal(self) -> bool:
        """What this rank puts in the boundary's broadcast: only rank 0's word counts, so only rank 0 reads a clock."""
        return self.rank == 0 and self.ripe()

    def agree(self, due: bool) -> None:
        """Rank 0's word from the boundary's broadcast: the same on every rank, so all gather at the same step."""
        self._agreed = due

    @property
    def has_steps(self) -> bool:
        """Steps trained since the last sample."""
        return self._train_seconds > 0

    def sample(self) -> dict[str, Any] | None:
        """The ``system`` event's fields now; the throughput is over the steps since the last sample.  With several
        ranks a collective every rank enters at the same step: rank 0 gets the fields, the others None."""
        peaks = {i: PEAKS.window_peak(i) for i in self.cuda}  # read once: a read starts a new window
        ranks = sorted(self.gather(self.reading(peaks)), key=lambda r: r["rank"])
        if self.rank != 0:
            self._new_interval()
            return None
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
            fields["gpus"] = {str(i): self._gpu(i, peaks[i]) for i in self.cuda}
        fields.update(world_size=self.world_size, ranks=ranks)
        self._new_interval()
        return fields

    def reading(self, peaks: dict[int, int]) -> dict[str, Any]:
        """This rank's own throughput (its counts, not times the world size) and memory: the torch allocator's on a
        GPU (now, and the peak since the last sample), else the process's RSS (now, and its peak since it began)."""
        out: dict[str, Any] = {"rank": self.rank}
        if self._train_seconds > 0:
            out["samples_per_s"] = round(self._interval[0] / self._train_seconds, 2)
            out["tokens_per_s"] = round(self._interval[1] / self._train_seconds, 1)
        if self.cuda:
            now, peak = sum(torch.cuda.memory_allocated(i) for i in self.cuda), sum(peaks.values())
        else:
            now = self.process.memory_info().rss
            peak = max(now, peak_rss())
        out.update(memory_gb=round(now / GIB, 3), peak_memory_gb=round(peak / GIB, 3))
        return out

    def _new_interval(self) -> None:
        self._last = time.monotonic()
        self._interval = [0, 0]
        self._train_seconds = 0.0
        self._agreed = False

    def _gpu(self, index: int, peak: int) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(index)
        stats: dict[str, Any] = {
            "name": props.name,
            "memory_total": props.total_memory,
            "allocated": torch.cuda.memory_allocated(index),
            "reserved": torch.cuda.memory_reserved(index),
            "max_allocated": peak,  # the peak since the last sample
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


def all_gather(reading: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's reading; without a process group (a test's stand-in for ``Distributed``) this rank's alone."""
    if not torch.distributed.is_initialized():
        return [reading]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, reading)
    return out


def peak_rss() -> int:
    """The process's highest RSS since it began, in bytes (0 where the OS does not say)."""
    if resource is None:  # pragma: no cover
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS says bytes, Linux KiB
