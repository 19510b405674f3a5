"""`q`: leave the run training, or stop it (after a checkpoint, or now); with no engine running, close the console."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from spu_engine.core.run_states import ENDED

CHOICES = [
    ("detach", "d", "Detach: leave training running"),
    ("stop_checkpoint", "c", "Stop after a checkpoint"),
    ("stop_now", "n", "Stop now (no checkpoint)"),
    ("cancel", "esc", "Cancel"),
]


class QuitScreen(ModalScreen[str]):
    """Dismisses with one of: detach, stop_checkpoint, stop_now, cancel."""

    BINDINGS = [
        Binding("d", "choose('detach')", "detach"),
        Binding("q", "close", "close the console", show=False),
        Binding("c", "choose('stop_checkpoint')", "stop after checkpoint"),
        Binding("n", "choose('stop_now')", "stop now"),
        Binding("escape", "choose('cancel')", "cancel"),
    ]

    def __init__(self, engine_alive: bool, state: str = "", run_dir: str = "") -> None:
        """``state``, ``run_dir``: the run's, said when no engine runs (what quitting leaves behind)."""
        super().__init__()
        self.engine_alive = engine_alive
        self.state = state
        self.run_dir = run_dir

    def compose(self) -> ComposeResult:
        with Vertical(id="quit-box") as box:
            box.border_title = "Quit"
            if self.engine_alive:
                yield Static("The engine runs in its own process. What should it do?")
                for choice, key, label in CHOICES:
                    yield Button(
                        Text(f"{key:>3}  {label}"),
                        id=choice,
                        compact=True,
                        variant="primary" if choice == "detach" else "default",
                    )
            else:
                yield Static(self._no_engine())
                yield Button(Text("  q  Close the console"), id="detach", compact=True, variant="primary")
                yield Button(Text("esc  Cancel"), id="cancel", compact=True)

    def _no_engine(self) -> str:
        """What quitting does when no engine runs: only the console closes; nothing of the run changes."""
        if self.state in ENDED:
            said = f"This run has {self.state} and its engine has exited."
        else:
            said = "No engine is connected: the console shows the run's history."
        again = f"\nReopen it with: spu-tui attach {self.run_dir}" if self.run_dir else ""
        return f"{said}\nQuitting closes the console; the run folder stays as it is.{again}"

    def action_close(self) -> None:
        """`q` again: with no engine, close the console (with one, `q` is no choice: the engine's fate is asked)."""
        if not self.engine_alive:
            self.dismiss("detach")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id or "cancel")

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)
