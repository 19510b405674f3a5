"""``spu policy validate`` and ``spu policy schema``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from spu_engine.cli.app import policy_app
from spu_engine.core.model_source import ModelLoadError
from spu_engine.core.policy import PolicyError
from spu_engine.core.policy_files import json_schema
from spu_engine.core.run_setup import fail, out, read_policy


@policy_app.command("validate")
def policy_validate(
    files: list[Path] = typer.Argument(..., help="one or more policy files"),
    model: str | None = typer.Option(
        None, help="also check every pattern and block index against this model (default: the file alone is checked)"
    ),
) -> None:
    """Check policy files (each said ok or why not); with --model, check their selectors against the model's
    parameters, loaded once.  Exit 2 when any is refused."""
    checked = _model_check(model)
    refused = 0
    for file in files:
        try:
            pol = read_policy(file)
            checked(pol)
        except typer.Exit:
            refused += 1
            continue
        triggers = sum(e.is_trigger for e in pol.timeline)
        counts = f"{len(pol.freeze)} freeze rules, {len(pol.timeline)} timeline entries"
        out.print(f"[green]ok[/] {file}: {counts}" + (f" ({triggers} triggers)" if triggers else ""))
    if refused:
        raise typer.Exit(2)


def _model_check(model: str | None):
    """A check of a policy's selectors against ``model`` (loaded once here), or none without one."""
    if not model:
        return lambda policy: None
    from spu_engine.model.loading import find_units, load_model
    from spu_engine.runtime.selection import check_policy_against_model

    try:
        loaded = load_model(model)
    except ModelLoadError as exc:
        fail(str(exc))
    units = find_units(loaded)

    def check(policy) -> None:
        try:
            check_policy_against_model(policy, loaded, units)
        except PolicyError as exc:
            fail(str(exc))

    return check


@policy_app.command("schema")
def policy_schema() -> None:
    """Print the policy's JSON Schema (point your editor's YAML support at it)."""
    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
