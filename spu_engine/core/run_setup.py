"""What both command lines (``spu`` and ``spu-tui``) share before a run starts: one-line errors, reading policies,
run folders and settings, and a run's config built from the flags given. No torch: the console imports it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer
from rich.console import Console

from spu_engine.core import config as settings
from spu_engine.core.policy import Policy, PolicyError
from spu_engine.core.policy_files import load_policy
from spu_engine.core.runs import CONFIG, POLICY, checkpoint_config
from spu_engine.core.shorthands import with_shorthands
from spu_engine.core.validation import error_text
from spu_engine.core.writes import WriteError, atomic_write_text

err = Console(stderr=True, soft_wrap=True)
out = Console()

TEXT_COLUMN_HELP = settings.RunSettings.model_fields["text_column"].description
LABEL_COLUMN_HELP = settings.RunSettings.model_fields["label_column"].description


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def default_run_dir(model: str, task: str) -> Path:
    short = Path(model.rstrip("/")).name.replace("/", "-") or "model"
    if short == "model":
        short = Path(model.rstrip("/")).parent.name or short
    return Path("runs") / f"{short}-{task}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_trackers(config) -> None:
    """A tracker whose package is missing: one line and exit 2, before anything loads."""
    from spu_engine.core.trackers import unavailable

    problem = unavailable(config.report_to)
    if problem:
        fail(problem)


def build_config(**options):
    """The run's ``EngineConfig`` from settings (None: not given, the field's default); an invalid one is a
    one-line error naming the flag to fix."""
    try:
        return settings.EngineConfig(**{k: v for k, v in options.items() if v is not None})
    except Exception as exc:  # pydantic ValidationError -> one line per field
        errors = getattr(exc, "errors", None)
        if errors:
            fail("; ".join(_option_error(e) for e in errors()))
        raise


def _option_error(error: dict) -> str:
    """One pydantic error as the flag to fix: '--max-length: ... (got 4)'; a check across settings names its key
    first."""
    message = error_text(error)
    if not error["loc"]:  # e.g. 'data: data path ... does not exist' from the task inference
        key, _, rest = message.partition(": ")
        return f"--{key.replace('_', '-')}: {rest}"
    return f"--{'-'.join(str(p) for p in error['loc']).replace('_', '-')}: {message} (got {error.get('input')!r})"


def config_from_policy(pol: Policy, source: Path | None, **flags):
    """The policy's ``run:`` settings (and its ``machine:``'s threads), with the flags given on the command line
    taking precedence.

    A flag that changes a value the file sets is said on stderr (one line): a replay with a
    different --steps or --lr has a different LR schedule, so different losses.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    base = pol.run.model_dump(include=pol.run.model_fields_set) if pol.run else {}
    if pol.machine is not None and pol.machine.threads <= (os.cpu_count() or 1):  # CPU sums depend on them
        base["threads"] = pol.machine.threads  # (more than this machine has would only oversubscribe it)
    changed = [f"--{k.replace('_', '-')} {base[k]} -> {v}" for k, v in given.items() if k in base and base[k] != v]
    if changed:
        err.print(
            f"note: command-line flags override the run settings of {source}: {', '.join(changed)}", highlight=False
        )
    return build_config(**{**base, **given})


def read_policy(path: Path | None, **shorthands: str | None) -> Policy:
    """The policy file (none: the empty policy) with the sections the shorthand flags given write
    (``--peft``, ``--prune``, ``--freeze``: ``core.shorthands``); a bad one is a one-line error."""
    try:
        return with_shorthands(load_policy(path) if path is not None else Policy(), path, **shorthands)
    except PolicyError as exc:
        fail(str(exc))
        raise  # unreachable


def resume_policy(run: Path) -> Policy | None:
    """policy.yaml of a run being resumed, or None when it is unreadable: the checkpoint holds the policy, and a
    resume always continues with that one, so a damaged policy.yaml must not block it."""
    try:
        return load_policy(run / POLICY)
    except PolicyError as exc:
        err.print(
            f"[yellow]note:[/] {exc}\n  resuming with the policy stored in the checkpoint; "
            "the unreadable file is kept as policy.yaml.unreadable",
            highlight=False,
        )
        return None


def read_run_config(run: Path, restore: bool = False) -> dict:
    """A run's config.json as a dict; a damaged one, or a missing one with no checkpoint, is a one-line error.

    A missing one is taken from the newest checkpoint's state.json, which holds the same settings, and said;
    ``restore`` (a resume) writes it back."""
    path = run / CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        found = checkpoint_config(run)
        if found is None:
            fail(f"{run} is not a run folder (no config.json, and no checkpoint holding its settings)")
        data, checkpoint = found
        restored = ""
        if restore:
            try:
                atomic_write_text(path, json.dumps(data, indent=1))
                restored = "; config.json is written anew from them"
            except WriteError as exc:
                restored = f"; config.json could not be written anew ({exc})"
        err.print(
            f"note: {path} is missing; the run's settings are taken from {checkpoint.name}/state.json{restored}",
            highlight=False,
        )
    except (OSError, ValueError) as exc:
        fail(
            f"{path} cannot be read ({exc}); the run's settings are also in each checkpoint's state.json under 'config'"
        )
    if not isinstance(data, dict):
        fail(f"{path} is not a JSON object")
    return settings.recorded(data)
