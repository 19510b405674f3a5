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
    file: Path,
    model: str | None = typer.Option(
        None, help="also check every pattern and block index against this model (default: the file alone is checked)"
    ),
) -> None:
    """Check a policy file; with --model, check its selectors against the model's parameters."""
    pol = read_policy(file)
    if model:
        from spu_engine.model.loading import find_units, load_model
        from spu_engine.runtime.selection import check_policy_against_model

        try:
            m = load_model(model)
            check_policy_against_model(pol, m, find_units(m))
        except (PolicyError, ModelLoadError) as exc:
            fail(str(exc))
    triggers = sum(e.is_trigger for e in pol.timeline)
    counts = f"{len(pol.freeze)} freeze rules, {len(pol.timeline)} timeline entries"
    out.print(f"[green]ok[/] {file}: {counts}" + (f" ({triggers} triggers)" if triggers else ""))


@policy_app.command("schema")
def policy_schema() -> None:
    """Print the policy's JSON Schema (point your editor's YAML support at it)."""
    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
