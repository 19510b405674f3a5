"""The machine beside the run, as the engine samples it (``system`` events): one row per measure, with its value now
and a sparkline of its recent samples, so GPU, memory and throughput sit beside the charts as in nvitop.

Rows exist only for what the engine measured: a CPU-only run has no GPU row, a GPU without NVML no utilisation row.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widget import Widget

from spu_engine.core.protocol import SystemEvent
from spu_engine.core.run_states import ENDED
from spu_tui.run_model import Aspect, RunModel

BLOCKS = "▁▂▃▄▅▆▇█"
LABEL = 12  # columns of a row's label
VALUE = 13  # columns of its value now


@dataclass
class Row:
    label: str
    value: str
    series: list[float]
    top: float | None = None  # the sparkline's full height (None: the largest sample shown)
    color: str = "cyan"


def rows(samples: list[SystemEvent]) -> list[Row]:
    """The rows ``samples`` (oldest first) support, GPUs first: what a GPU server's user looks at."""
    if not samples:
        return []
    last = samples[-1]
    out: list[Row] = []
    for index, gpu in (last.gpus or {}).items():
        history = [s.gpus[index] for s in samples if s.gpus and index in s.gpus]
        if gpu.utilization is not None:
            out.append(
                Row(
                    f"GPU{index} util",
                    f"{gpu.utilization:.0f} %",
                    [g.utilization or 0.0 for g in history],
                    100.0,
                    "green",
                )
            )
        if gpu.memory_used is not None:
            total = f"/{gib(gpu.memory_total)}" if gpu.memory_total else ""
            out.append(
                Row(
                    f"GPU{index} mem",
                    f"{gib(gpu.memory_used)}{total}",
                    [float(g.memory_used or 0) for g in history],
                    gpu.memory_total,
                    "green",
                )
            )
        if gpu.allocated is not None:
            out.append(
                Row(
                    f"GPU{index} torch",
                    gib(gpu.allocated),
                    [float(g.allocated or 0) for g in history],
                    gpu.memory_total,
                    "green",
                )
            )
        if gpu.max_allocated is not None:  # the highest allocation of each window: what a step really needs
            out.append(
                Row(
                    f"GPU{index} peak",
                    gib(gpu.max_allocated),
                    [float(g.max_allocated or 0) for g in history],
                    gpu.memory_total,
                    "green",
                )
            )
    if last.tokens_per_s is not None:
        out.append(Row("tokens/s", f"{last.tokens_per_s:,.0f}", [s.tokens_per_s or 0.0 for s in samples], color="cyan"))
    if last.samples_per_s is not None:
        out.append(
            Row("samples/s", f"{last.samples_per_s:,.1f}", [s.samples_per_s or 0.0 for s in samples], color="cyan")
        )
    if last.cpu_process is not None:
        cores = (last.cpu_count or 1) * 100.0
        out.append(
            Row("CPU engine", f"{last.cpu_process:.0f} %", [s.cpu_process or 0.0 for s in samples], cores, "yellow")
        )
    if last.cpu_machine is not None:
        out.append(
            Row("CPU machine", f"{last.cpu_machine:.0f} %", [s.cpu_machine or 0.0 for s in samples], 100.0, "yellow")
        )
    if last.rss is not None:
        out.append(Row("RAM engine", gib(last.rss), [float(s.rss or 0) for s in samples], last.ram_total, "magenta"))
    if last.ram_used is not None:
        total = f"/{gib(last.ram_total)}" if last.ram_total else ""
        out.append(
            Row(
                "RAM machine",
                f"{gib(last.ram_used)}{total}",
                [float(s.ram_used or 0) for s in samples],
                last.ram_total,
                "magenta",
            )
        )
    return out


def summary(sample: SystemEvent | None) -> str:
    """The header's line: each GPU's utilisation and memory, then the engine's CPU and RAM (no GPU text without one)."""
    if sample is None:
        return ""
    parts = []
    for index, gpu in (sample.gpus or {}).items():
        util = f" {gpu.utilization:.0f}%" if gpu.utilization is not None else ""
        memory = (
            f" {gib(gpu.memory_used)}/{gib(gpu.memory_total)}"
            if gpu.memory_used is not None and gpu.memory_total
            else ""
        )
        parts.append(f"GPU{index}{util}{memory}")
    if sample.cpu_process is not None:
        parts.append(f"CPU {sample.cpu_process:.0f}%")
    if sample.rss is not None:
        parts.append(f"RAM {gib(sample.rss)}")
    return " · ".join(parts)


def gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}G"


def sparkline(values: list[float], width: int, top: float | None) -> str:
    """The last ``width`` values as block characters, full height at ``top``."""
    shown = values[-width:] if width > 0 else []
    peak = top if top else max(shown, default=0.0)
    if not shown or peak <= 0:
        return BLOCKS[0] * len(shown)
    return "".join(BLOCKS[max(0, min(len(BLOCKS) - 1, round(v / peak * (len(BLOCKS) - 1))))] for v in shown)


class SystemView(Widget):
    """GPU, CPU, RAM and throughput: the value now and a sparkline of the samples, a row each."""

    WATCHES = (Aspect.SYSTEM,)
    DEFAULT_CSS = "SystemView { height: 1fr; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._rows: list[Row] = []
        self._ended = False

    def show(self, state: RunModel) -> None:
        self._rows = rows(list(state.system))
        self._ended = state.state in ENDED
        self.refresh()

    def render(self) -> Text:
        if not self._rows:
            if self._ended:  # a run recorded before the engine sampled the machine, or one shorter than an interval
                return Text(" no system samples in this run's history", style="italic dim")
            return Text(" waiting for the engine's first system sample", style="italic dim")
        width = max(0, self.size.width - LABEL - VALUE - 2)
        lines = []
        for row in self._rows:
            line = Text(f" {row.label:<{LABEL - 1}}", style="bold")
            line.append(f"{row.value:>{VALUE}} ")
            line.append(sparkline(row.series, width, row.top), style=row.color)
            lines.append(line)
        return Text("\n").join(lines)
