"""``spu train`` (in the foreground, with a progress bar) and the hidden ``spu engine`` that spu-tui starts."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.markup import escape

from spu_engine.cli.app import app
from spu_engine.core.checkpoint_pooling import pooling_note
from spu_engine.core.collapse import collapse_note
from spu_engine.core.run_options import run_options
from spu_engine.core.run_setup import (
    build_config,
    check_trackers,
    config_from_policy,
    default_run_dir,
    err,
    fail,
    out,
    read_policy,
    read_run_config,
    resume_policy,
)
from spu_engine.core.runs import POLICY
from spu_engine.core.shorthands import FREEZE_HELP, PEFT_HELP, PRUNE_HELP, SHORTHANDS

# The run flags a --resume takes over the run's config.json: how long and how often, and where it runs.
RESUME_OVERRIDES = (
    "steps",
    "batch_size",
    "eval_every",
    "checkpoint_every",
    "checkpoint_minutes",
    "device",
    "threads",
    "system_every",
    "sharding",
    "plan_peft",
    "report_to",
)


class ProgressSink:
    """Rich progress bar fed by engine events (called from the training thread)."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} samples/s"),
            TimeRemainingColumn(),
            console=out,
        )
        self.task = self.progress.add_task("train", total=total, loss="-", speed="-")

    def __call__(self, _line: bytes, ev: dict) -> None:
        kind = ev["type"]
        console = self.progress.console
        if kind == "step":
            self.progress.update(
                self.task, completed=ev["step"], loss=f"{ev['loss']:.4f}", speed=f"{ev['samples_per_s']:.1f}"
            )
        elif kind == "eval":
            skip = ("type", "t", "step")
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if k not in skip and isinstance(v, float))
            console.print(f"[cyan]eval[/] step {ev['step']}: {metrics}")
            if (collapsed := collapse_note(ev)) is not None:
                console.print(f"  [yellow]{escape(collapsed)}[/]", highlight=False)
        elif kind == "policy":
            console.print(f"[magenta]policy[/] step {ev['step']} ({ev['source']}): trainable {ev['trainable']:,}")
        elif kind == "log" and ev.get("about") == "generation":
            console.print(f"  [cyan]{escape(str(ev.get('message')))}[/]", highlight=False)
        elif kind in ("error", "log") and (kind == "error" or ev.get("level") != "info"):
            console.print(f"[red]{kind}[/] {ev.get('message')}", highlight=False)
        elif kind == "state":
            if ev["state"] == "training":
                self.progress.start()
                console.print(ev.get("message", ""))
            elif ev["state"] in ("finished", "stopped", "error"):
                self.progress.stop()
                console.print(f"[bold]{ev['state']}[/] {ev.get('message', '')}")
        elif kind == "checkpoint":
            console.print(f"checkpoint: {ev['path']}")
        elif kind == "resumed":
            self.progress.update(self.task, completed=ev["step"])
            console.print(f"[green]resumed[/] {ev['message']}")


@app.command()
@run_options
def train(
    flags: dict,
    policy: Path | None = typer.Option(
        None,
        help="policy YAML: its run: settings are the defaults of every run setting flag, "
        "its timeline is replayed at its steps",
    ),
    run_dir: Path | None = typer.Option(
        None,
        help="run folder (default runs/<model>-<task>-<time>); one that holds a run is refused (one whose run "
        "never trained is taken)",
    ),
    resume: Path | None = typer.Option(
        None, help="resume the run in this folder from its newest complete checkpoint (default: a new run)"
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="start the run in --run-dir again from step 0: its checkpoints and history are deleted "
        "(default: off, a --run-dir that holds a run is refused)",
    ),
    fresh_optimizer: bool = typer.Option(
        False,
        "--fresh-optimizer",
        help="with --resume: continue from a checkpoint whose weights verify but whose optimizer state is missing "
        "or unusable, with fresh optimizer state (default: off, such a checkpoint is refused)",
    ),
    peft: str | None = typer.Option(None, help=PEFT_HELP, rich_help_panel=SHORTHANDS),
    prune: str | None = typer.Option(None, help=PRUNE_HELP, rich_help_panel=SHORTHANDS),
    freeze: str | None = typer.Option(None, help=FREEZE_HELP, rich_help_panel=SHORTHANDS),
) -> None:
    """Train in the foreground with a progress bar; writes a run folder and serves its socket.

    --policy FILE alone replays the run FILE was exported from (its run: section
    holds the settings); flags given with it override those settings.
    Ctrl-C or SIGTERM: checkpoint, then stop (a second Ctrl-C stops at once).
    --resume RUN continues from its newest complete checkpoint; --steps,
    --batch-size, --eval-every, --checkpoint-every, --checkpoint-minutes, --device,
    --threads, --system-every and --report-to given with it override the run's
    config.json (other run settings are the run's; a deleted config.json is taken
    from the newest checkpoint).  A --run-dir that already holds a run is refused
    unless --overwrite says to start it again; one whose run never trained is taken.
    """
    from spu_engine.core.runs import RunFolderError, holds_run, is_live, never_trained
    from spu_engine.loop.serve import serve

    if fresh_optimizer and resume is None:
        fail("--fresh-optimizer goes with --resume RUN")
    if overwrite and resume is not None:
        fail("--overwrite starts a run again from step 0 and --resume continues it; choose one")
    shorthands = {"peft": peft, "prune": prune, "freeze": freeze}
    if resume is not None and any(shorthands.values()):
        fail("--peft, --prune and --freeze set a new run's policy; a resumed run keeps its own")
    if resume is not None:
        if never_trained(resume):
            fail(
                f"{resume} never trained (its run ended before the first step): there is nothing to resume; "
                f"start a run there with `spu train --run-dir {resume}` and the run's settings"
            )
        run_dir = resume
        ignored = [f"--{k.replace('_', '-')}" for k in flags if k not in RESUME_OVERRIDES]
        if ignored:
            err.print(f"note: a resumed run keeps its own settings; ignored: {', '.join(ignored)}", highlight=False)
        overrides = {k: v for k, v in flags.items() if k in RESUME_OVERRIDES}
        config = build_config(**{**read_run_config(resume, restore=True), **overrides})
        pol = resume_policy(resume)
    else:
        pol = read_policy(policy, **shorthands)
        config = config_from_policy(pol, policy, **flags)
        run_dir = run_dir or default_run_dir(config.model, config.task)
        if never_trained(run_dir):  # it holds nothing to lose: taken as --overwrite would, its old run files go
            err.print(f"note: {run_dir} holds a run that never trained; starting this one there", highlight=False)
            overwrite = True
        elif holds_run(run_dir) and not overwrite and not is_live(run_dir):  # a live one: the run lock refuses it
            fail(
                f"--run-dir {run_dir} already holds a run; continue it with `spu train --resume {run_dir}`, "
                f"or start it again from step 0 with --overwrite (deletes its checkpoints and history)"
            )
    check_trackers(config)
    sink = ProgressSink(config.steps)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 talks
        out.print(f"run folder: {run_dir}")
        out.print(f"task: {config.task}", highlight=False)
        if config.pooling is not None:
            out.print(pooling_note(config.model, config.pooling), highlight=False)
    try:
        code = serve(
            config,
            pol,
            Path(run_dir),
            resume=resume is not None,
            sinks=[sink],
            fresh_optimizer=fresh_optimizer,
            overwrite=overwrite,
        )
    except RunFolderError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    raise typer.Exit(code)


@app.command(hidden=True)
def engine(
    run_dir: Path = typer.Option(..., help="run folder holding config.json and policy.yaml"),
    resume: bool = typer.Option(False, help="resume from the newest complete checkpoint"),
) -> None:
    """Run the engine process for a prepared run folder (started by spu-tui)."""
    from spu_engine.core.runs import RunFolderError
    from spu_engine.loop.serve import serve

    config = build_config(**read_run_config(run_dir, restore=resume))
    pol = resume_policy(run_dir) if resume else read_policy(run_dir / POLICY)
    try:
        code = serve(config, pol, run_dir, resume=resume)
    except RunFolderError as exc:
        fail(str(exc))
    raise typer.Exit(code)
