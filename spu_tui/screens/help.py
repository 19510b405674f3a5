"""Every key binding, in one place."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

BINDINGS_HELP = [
    (
        "Unit tree",
        [
            ("↑ ↓", "move the cursor"),
            ("→ / enter", "expand a unit to its tensors (again: collapse)"),
            ("←", "collapse / go to the unit"),
            ("space", "toggle the unit or tensor under the cursor: trainable ↔ frozen"),
            (
                "f",
                "freeze the cursor's unit and every unit above it on screen (embeddings … cursor: the layers below it in the network)",
            ),
            (
                "u",
                "unfreeze every unit below the cursor on screen (after the cursor … head: the layers above it in the network)",
            ),
            (
                "· then …",
                "a row's change is sent, then queued in the engine; the mark goes when it applies at the next step",
            ),
            ("● ○", "narrow tree: a tensor trains (●) or is frozen (○); then its size and sparsity"),
        ],
    ),
    (
        "Run",
        [
            ("p", "pause / resume training"),
            ("e", "export the replayable policy YAML (asks for a path)"),
            ("s", "save a checkpoint now"),
            ("r", "evaluate now"),
            (
                "a",
                "adapter ablation (paused or finished run with Houlsby adapters): the metric without each "
                "block's adapters and each span of blocks, as a table and heat map; the run is unchanged",
            ),
            (
                "z",
                "undo the last change made from a console (recorded as a change of its own, so a replay "
                "stays exact; refused, with the reason, when it cannot be undone, e.g. LoRA that has trained)",
            ),
            (
                "q",
                "quit: detach (training goes on), stop after a checkpoint, or stop now; with no engine running "
                "(a finished run, or its history alone) q again closes the console",
            ),
        ],
    ),
    (
        "Panels",
        [
            (
                "1 … 6",
                "below 160x45 (80x24, 120x36): the panel beside the tree: loss, sparsity, learning, controls, log, "
                "system (GPU, CPU, RAM, throughput); from 160x45 all are shown",
            ),
            (
                "v",
                "learning panel: preview freezing the front blocks the advisor found settled "
                "(gradient-norm change below 5 % over 3 intervals); v again applies it (z undoes)",
            ),
            (
                "[ ]",
                "sparsity panel: each unit's sparsity at the end of the IMP round before / after (past the last: now)",
            ),
            ("tab / shift+tab", "move between the tree and the controls"),
            (
                "esc",
                "leave a text field (back to the tree): in a field letters type, so p, q, b … act again only "
                "outside it; applying a section or adding a trigger leaves the field too",
            ),
            (
                "edit a field",
                "the section's what-if line shows what it would do: trainable parameters, backward compute kept, notes; "
                "on a choice (value ▼) enter, space or down lists the options, enter picks one, esc keeps the value",
            ),
            (
                "enter / apply",
                "apply that section: 'sent', then 'queued' once the engine has it, until it applies at the next step",
            ),
            ("x (in rules)", "remove the highlighted freeze rule (applied like any change; z undoes it)"),
            (
                "x (in triggers)",
                "remove the highlighted timeline entry or trigger; the field below it adds one (enter)",
            ),
            ("?", "this help; esc or ? closes it"),
        ],
    ),
    (
        "Other runs, metrics, plots",
        [
            (
                "b / c",
                "the runs beside this one, with their final metrics: enter opens one (live: attached; "
                "else read-only), space marks runs to compare, o or a header click sorts, esc goes back",
            ),
            (
                "compared runs",
                "drawn on the loss plot in their own colours, with their policy changes; followed while they train (read only, never written)",
            ),
            (
                "/",
                "filter the plotted metrics by glob (train.loss, eval.*, lr, grad_norm.block*, "
                "sparsity.*, system.*; no wildcard: anywhere in the name); enter keeps it, esc clears it",
            ),
            ("w", "loss plot x axis: steps or wall time (minutes since each run started)"),
            ("g", "save the plot on screen (a graphic) as an SVG in the current folder"),
        ],
    ),
]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        table = Table(box=None, expand=True, show_header=False, padding=(0, 1))
        table.add_column("key", style="bold cyan", no_wrap=True)
        table.add_column("does")
        for title, rows in BINDINGS_HELP:
            table.add_row(f"[bold underline]{title}[/]", "")
            for key, text in rows:
                table.add_row(key, text)
        with VerticalScroll(id="help-box") as box:
            box.border_title = "keys  (esc closes)"
            yield Static(table)
