"""The machine beside the run, as the engine samples it (``system`` events): one row per measure, with its value now
and a sparkline of its recent samples, so GPU, memory and throughput sit beside the charts as in nvitop.

Rows exist only for what the engine measured: a CPU-only run has no GPU row, a GPU without NVML no utilisation row.
A run of several ranks (torchrun) adds its world size and each rank's own samples/s and memory on top, or, where a
line each does not fit, their range with the slowest and fullest rank named: an unequal rank is what slows them all.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from rich.text import Text
from textual.widget import Widget

from spu_engine.core.protocol import SystemEvent
from spu_engine.core.run_states import ENDED
from spu_tui.run_model import Aspect, RunModel

BLOCKS = "▁▂▃▄▅▆▇█"
LABEL = 12  # columns of a row's label
VALUE = 13  # columns of its value now
SUMMARY = 3  # lines that sum the ranks up when a line each does not fit


@dataclass
class Row:
    label: str
    value: str
    series: list[float]
    top: float | None = None  # the sparkline's full height (None: the largest sample shown)
    color: str = "cyan"
    note: str = ""  # between the value and the sparkline (a rank's memory)


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


def rank_rows(samples: list[SystemEvent], room: int, width: int) -> list[Row]:
    """The world size, then each rank's samples/s (a sparkline of its samples) and memory now/peak in GiB, when
    ``room`` lines hold a line each; else ``SUMMARY`` lines of ranges naming the slowest and fullest rank.  Nothing
    for one process or an engine older than ``ranks``: such a run's panel looks as it always did."""
    last = samples[-1] if samples else None
    ranks = sorted(last.ranks or [], key=lambda r: r.rank) if last else []
    world = (last.world_size or len(ranks)) if last else 0
    if world <= 1 or not ranks:
        return []
    rates = {r.rank: r.samples_per_s for r in ranks if r.samples_per_s is not None}
    slowest = min(rates, key=lambda k: rates[k]) if len(set(rates.values())) > 1 else None
    if 1 + len(ranks) <= max(room, SUMMARY):
        notes = [f"{gb(r.memory_gb)}/{gb(r.peak_memory_gb)}" for r in ranks]
        pad = max(len("mem/peak"), *map(len, notes))
        series: dict[int, list[float]] = {r.rank: [] for r in ranks}
        for sample in (s for s in samples if s.world_size == world):  # a run resumed on another keeps older ones
            for x in sample.ranks or []:
                series.setdefault(x.rank, []).append(x.samples_per_s or 0.0)
        top = max((v for values in series.values() for v in values), default=0.0)  # one scale: ranks compare
        head = Row(f"{world} ranks", "samples/s", [], note=f"{'mem/peak':>{pad}}", color="cyan")
        return [head] + [
            Row(
                f"rank {r.rank}",
                "-" if r.samples_per_s is None else f"{r.samples_per_s:,.1f}",
                series[r.rank],
                top or None,
                "yellow" if r.rank == slowest else "cyan",
                note=f"{note:>{pad}}",
            )
            for r, note in zip(ranks, notes)
        ]
    room_for_note = width - LABEL - VALUE - 1
    if slowest is not None:
        note = fit(
            room_for_note,
            f"samples/s, slowest rank {slowest}",
            f"/s, slowest rank {slowest}",
            f"slowest rank {slowest}",
            f"slowest r{slowest}",
        )
    else:
        note = fit(room_for_note, "samples/s", "/s") if rates else "no steps yet"
    out = [Row(f"{world} ranks", spread(rates.values(), "{:,.1f}"), [], note=note)]
    for label, values in (
        ("memory", {r.rank: r.memory_gb for r in ranks}),
        ("peak memory", {r.rank: r.peak_memory_gb for r in ranks}),
    ):
        known = {k: v for k, v in values.items() if v is not None}
        most = max(known, key=lambda k: known[k]) if len(set(known.values())) > 1 else None
        note = fit(room_for_note, f"most on rank {most}", f"most r{most}") if most is not None else ""
        out.append(Row(label, spread(known.values(), "{:.1f}G"), [], note=note, color="green"))
    return out


def spread(values: Iterable[float], form: str) -> str:
    """The lowest and highest of ``values`` (one when they are equal), each as ``form`` has it."""
    values = sorted(values)
    if not values:
        return "-"
    low, high = form.format(values[0]), form.format(values[-1])
    return low if low == high else f"{low}-{high}"


def fit(room: int, *options: str) -> str:
    """The first option that fits ``room`` columns (the last, the shortest, when none does)."""
    return next((o for o in options if len(o) <= room), options[-1])


def gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}G"


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
        self._samples: list[SystemEvent] = []
        self._rows: list[Row] = []
        self._ended = False

    def show(self, state: RunModel) -> None:
        self._samples = list(state.system)
        self._rows = rows(self._samples)
        self._ended = state.state in ENDED or state.state == "detached"  # no engine: the rows are its last reading
        self.refresh()

    def render(self) -> Text:
        if not self._rows:
            if self._ended:  # a run recorded before the engine sampled the machine, or one shorter than an interval
                return Text(" no system samples in this run's history", style="italic dim")
            return Text(" waiting for the engine's first system sample", style="italic dim")
        lines = []
        room = self.size.height - len(self._rows) - int(self._ended)  # the machine's rows (and the note) stay whole
        for row in rank_rows(self._samples, room, self.size.width) + self._rows:
            line = Text(f" {row.label:<{LABEL - 1}}", style="bold")
            line.append(f"{row.value:>{VALUE}} ")
            if row.note:
                line.append(f"{row.note} ")
            width = max(0, self.size.width - LABEL - VALUE - 2 - (len(row.note) + 1 if row.note else 0))
            line.append(sparkline(row.series, width, row.top), style=row.color)
            lines.append(line)
        if self._ended:
            at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self._samples[-1].t))
            lines.append(Text(f" the engine's last reading, at {at}: it no longer runs", style="italic dim"))
        text = Text("\n").join(lines)
        text.no_wrap, text.overflow = True, "ellipsis"  # a line too long for a narrow panel is cut, not wrapped
        return text
