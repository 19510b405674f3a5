"""`e`: ask where to write the replayable policy YAML."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from spu_engine.core.run_guard import policy_file_problem


class ExportScreen(ModalScreen[tuple[Path, bool] | None]):
    """Dismissed with (path, overwrite): overwrite only after a second enter on a file that exists; never a run's own
    file or one in a checkpoint (``run_guard.policy_file_problem``)."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, default: Path) -> None:
        super().__init__()
        self.default = default
        self.confirm: Path | None = None  # the existing file a second enter replaces

    def compose(self) -> ComposeResult:
        with Vertical(id="export-box") as box:
            box.border_title = "Export policy"
            yield Static("Write the replayable policy (start state + every change with its step) to:")
            yield Input(str(self.default), id="export-path")
            yield Static("enter writes  ·  esc cancels", classes="hint")
            yield Static("", id="export-error")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        error = self.query_one("#export-error", Static)
        if not text:
            error.update("give a file path, e.g. runs/<name>/policy-export.yaml")
            return
        path = Path(text).expanduser()
        if path.is_dir():
            error.update(f"{path} is a folder; give a file name such as {path / 'policy.yaml'}")
            return
        problem = policy_file_problem(path)  # the engine refuses it too: said here before anything is sent
        if problem is not None:
            error.update(problem)
            return
        if path.exists() and self.confirm != path:
            self.confirm = path
            error.update(f"{path} exists: enter again replaces it (its permissions are kept), or change the name")
            return
        self.dismiss((path, path.exists()))

    def action_cancel(self) -> None:
        self.dismiss(None)
