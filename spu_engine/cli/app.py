"""The ``spu`` app and its ``policy`` group; the commands register on them (``cli/__init__.py``)."""

from __future__ import annotations

import os

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SPU: selective parameter updating, headless.")
policy_app = typer.Typer(no_args_is_help=True, help="Validate policies and print their JSON schema.")
app.add_typer(policy_app, name="policy")


def main() -> None:  # pragma: no cover - entry point for python -m
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
