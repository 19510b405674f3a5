"""Run name, model and the machine (GPU, CPU, RAM); state, step / total, samples/s, tokens/s and ETA: two lines
so 80 columns suffice.  An engine that has said nothing for a few seconds is said instead of its speed and ETA,
which would otherwise go on promising progress that is not happening."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.text import Text
from textual.reactive import reactive
from textual.timer import Timer
from textual.widget import Widget

from spu_engine.core.protocol import SystemEvent
from spu_engine.core.run_states import ENDED
from spu_tui.run_model import Aspect, RunModel
from spu_tui.widgets.system_view import summary

STATE_STYLE = {
    "training": "bold green",
    "paused": "bold yellow",
    "stopped": "bold magenta",
    "finished": "bold cyan",
    "error": "bold red",
    "detached": "bold red",
    "loading": "bold blue",
    "connecting": "bold blue",
}


class RunHeader(Widget):
    WATCHES = (Aspect.RUN, Aspect.PROGRESS, Aspect.SYSTEM)

    run_name: reactive[str] = reactive("?")
    model: reactive[str] = reactive("?")
    step: reactive[int] = reactive(0)
    total: reactive[int] = reactive(0)
    samples_per_s: reactive[float] = reactive(0.0)
    state: reactive[str] = reactive("connecting")
    eta_s: reactive[float | None] = reactive(None)
    waiting: reactive[str] = reactive("")  # before the first step: what the engine is busy with
    waiting_since: float = 0.0  # wall time it began: the header counts the seconds
    machine: reactive[str] = reactive("")  # the newest system sample, summed up
    machine_at: reactive[float | None] = reactive(None)  # its wall time, once no engine runs: a reading, not live
    tokens_per_s: reactive[float | None] = reactive(None)
    silent: reactive[str] = reactive("")  # "engine silent for 12 s — last heard at step 749", or ""

    _clock: Timer | None = None  # redraws the seconds of a wait or a reading's age, only while there is one
    _silence: Callable[[], str] | None = None  # asked every second while an engine is attached (the session's)

    def on_mount(self) -> None:
        self._clock = self.set_interval(1.0, self.refresh, pause=True)
        self._follow_clock()

    def _follow_clock(self) -> None:
        if self._clock is None:
            return
        if self.waiting or self.machine_at is not None:
            self._clock.resume()
        else:
            self._clock.pause()

    def listen(self, silence: Callable[[], str]) -> None:
        """Ask ``silence`` every second: the engine is attached, and a silent one sends no event to redraw on."""
        self._silence = silence
        self.set_interval(1.0, self._listen)

    def _listen(self) -> None:
        if self._silence is not None:
            self.silent = self._silence()

    def show(self, state: RunModel) -> None:
        self.run_name, self.model, self.state = state.run, state.model, state.state
        self.step, self.total, self.samples_per_s, self.eta_s = (
            state.step,
            state.total_steps,
            state.samples_per_s,
            state.eta_s,
        )
        self.waiting, self.waiting_since = state.waiting, state.waiting_since
        sample = state.system[-1] if state.system else None
        self.machine = summary(sample)
        gone = state.state in ENDED or state.state == "detached"  # no engine: its last figures are not the machine now
        self.machine_at = sample.t if gone and sample is not None else None
        self.tokens_per_s = tokens_per_s(state.samples_per_s, sample)
        self._follow_clock()

    def render(self) -> Text:
        top = Text()
        top.append(" SPU ", style="bold reverse")
        top.append(f" {self.run_name}", style="bold")
        top.append(f"  model {self.model}", style="dim")
        if self.machine and self.machine_at is not None:
            age = format_eta(max(0.0, time.time() - self.machine_at))
            top.append(f"  last reading {age} ago: {self.machine}", style="dim")
        elif self.machine:
            top.append(f"  {self.machine}", style="bold cyan")
        bottom = Text()
        bottom.append(f" {self.state:<9}", style=STATE_STYLE.get(self.state, "bold"))
        bottom.append(f" step {self.step}/{self.total}")
        if self.silent:
            bottom.append(f"  {self.silent}", style="bold red")
        elif self.waiting:
            bottom.append(f"  {self.waiting}", style="italic")
            if self.waiting_since:
                bottom.append(f" ({max(0, time.time() - self.waiting_since):.0f} s)", style="dim")
        else:
            bottom.append(f"  {self.samples_per_s:,.1f} samples/s")
            if self.tokens_per_s is not None:
                bottom.append(f"  {self.tokens_per_s:,.0f} tokens/s")
            bottom.append(f"  ETA {format_eta(self.eta_s)}")
        top.truncate(self.size.width, overflow="ellipsis")
        bottom.truncate(self.size.width, overflow="ellipsis")
        return Text("\n").join([top, bottom])


def tokens_per_s(samples_per_s: float, sample: SystemEvent | None) -> float | None:
    """Tokens/s beside the header's samples/s, on the same training clock: the samples/s times the tokens per sample
    of the newest system sample (whose own rates leave evaluations and pauses out too)."""
    if sample is None or not sample.samples_per_s or sample.tokens_per_s is None:
        return None
    return samples_per_s * sample.tokens_per_s / sample.samples_per_s


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
