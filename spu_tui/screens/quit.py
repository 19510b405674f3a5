"""`q`: leave the run training, or stop it (after a checkpoint, or now)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

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
        Binding("c", "choose('stop_checkpoint')", "stop after checkpoint"),
        Binding("n", "choose('stop_now')", "stop now"),
        Binding("escape", "choose('cancel')", "cancel"),
    ]

    def __init__(self, engine_alive: bool) -> None:
        super().__init__()
        self.engine_alive = engine_alive

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
                yield Static("The engine is not running.")
                yield Button(Text("  d  Quit"), id="detach", compact=True, variant="primary")
                yield Button(Text("esc  Cancel"), id="cancel", compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id or "cancel")

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)
