"""`e`: ask where to write the replayable policy YAML."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static


class ExportScreen(ModalScreen[Path | None]):
    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, default: Path) -> None:
        super().__init__()
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(id="export-box") as box:
            box.border_title = "Export policy"
            yield Static("Write the replayable policy (start state + every change with its step) to:")
            yield Input(str(self.default), id="export-path")
            yield Static("enter writes  ·  esc cancels", classes="hint")
            yield Static("", id="export-error")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            self.query_one("#export-error", Static).update("give a file path, e.g. runs/<name>/policy-export.yaml")
            return
        path = Path(text).expanduser()
        if path.is_dir():
            self.query_one("#export-error", Static).update(f"{path} is a folder; give a file name such as {path / 'policy.yaml'}")
            return
        self.dismiss(path)

    def action_cancel(self) -> None:
        self.dismiss(None)
