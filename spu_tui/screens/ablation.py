"""`a`: the run's adapters removed block by block, as `spu ablate` measures it, shown over the run screen."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from spu_engine.ablation_view import ablation_views


class AblationScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,a", "dismiss", "close")]

    def __init__(self, report: dict[str, Any], step: int | None) -> None:
        super().__init__()
        self.report, self.step = report, step

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="ablation-box") as box:
            box.border_title = f"Adapter ablation{f' (checkpoint of step {self.step})' if self.step is not None else ''}"
            for view in ablation_views(self.report):
                yield Static(view)
            yield Static("esc closes  ·  the run is unchanged: a copy of its checkpoint was evaluated", classes="hint")
