"""Run name, model, step / total, samples/s, state and ETA; two lines so 80 columns suffice."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ..run_state import Aspect, RunState

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
    WATCHES = (Aspect.RUN, Aspect.PROGRESS)

    run_name: reactive[str] = reactive("?")
    model: reactive[str] = reactive("?")
    step: reactive[int] = reactive(0)
    total: reactive[int] = reactive(0)
    samples_per_s: reactive[float] = reactive(0.0)
    state: reactive[str] = reactive("connecting")
    eta_s: reactive[float | None] = reactive(None)
    waiting: reactive[str] = reactive("")  # before the first step: what the engine is busy with

    def show(self, state: RunState) -> None:
        self.run_name, self.model, self.state = state.run, state.model, state.state
        self.step, self.total, self.samples_per_s, self.eta_s = state.step, state.total_steps, state.samples_per_s, state.eta_s
        self.waiting = state.waiting

    def render(self) -> Text:
        top = Text()
        top.append(" SPU ", style="bold reverse")
        top.append(f" {self.run_name}", style="bold")
        top.append(f"  model {self.model}", style="dim")
        bottom = Text()
        bottom.append(f" {self.state:<9}", style=STATE_STYLE.get(self.state, "bold"))
        bottom.append(f" step {self.step}/{self.total}")
        if self.waiting:
            bottom.append(f"  {self.waiting}", style="italic")
        else:
            bottom.append(f"  {self.samples_per_s:,.1f} samples/s")
            bottom.append(f"  ETA {format_eta(self.eta_s)}")
        top.truncate(self.size.width, overflow="ellipsis")
        bottom.truncate(self.size.width, overflow="ellipsis")
        return Text("\n").join([top, bottom])


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
