"""`a`: the run's adapters removed block by block, as `spu ablate` measures it, shown over the run screen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from spu_engine.core.ablation_view import ablation_views


class AblationScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,a", "dismiss", "close")]

    def __init__(self, report: dict[str, Any], step: int | None) -> None:
        super().__init__()
        self.report, self.step = report, step

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="ablation-box") as box:
            box.border_title = (
                f"Adapter ablation{f' (checkpoint of step {self.step})' if self.step is not None else ''}"
            )
            for view in ablation_views(self.report):
                yield Static(view)
            yield Static("esc closes  ·  the run is unchanged: a copy of its checkpoint was evaluated", classes="hint")


class AblationFailed(Exception):
    """`spu ablate` failed; the message is the last line it said."""


def ablate(run_dir: Path) -> dict[str, Any]:
    """The ablation report of the run's newest checkpoint, from `spu ablate --json` in a process of its own."""
    command = [sys.executable, "-m", "spu_engine.cli", "ablate", "--run", str(run_dir), "--json"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        said = proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}"
        raise AblationFailed(said.splitlines()[-1])
    return json.loads(proc.stdout)
