"""``spu policy validate`` and ``spu policy schema``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..model_source import ModelLoadError
from ..policy import PolicyError
from ..policy_files import json_schema
from ..run_setup import fail, out, read_policy
from .app import policy_app


@policy_app.command("validate")
def policy_validate(
    file: Path,
    model: Optional[str] = typer.Option(None, help="also check every pattern and block index against this model"),
) -> None:
    """Check a policy file; with --model, check its selectors against the model's parameters."""
    pol = read_policy(file)
    if model:
        from ..model import find_units, load_model
        from ..selection import check_policy_against_model

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
