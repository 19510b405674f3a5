"""The run flags that ``spu train`` and ``spu-tui`` share, made from the fields of ``EngineConfig``.

Every field of the settings (``RunSettings``, and where a run happens) is one option of both commands, so a
setting added to ``spu_engine/core/config.py`` is a flag of both at once:

- the flag is the field's name, ``max_eval_samples`` -> ``--max-eval-samples`` (a bool one is ``--x/--no-x``);
- its help is the field's description, followed by the field's default (none: unset or empty, unless the
  description says what happens by default);
- its type is the field's annotation, None left out; a ``list[str]`` is given as one comma-separated string;
- its value, when not given, is None: the policy's ``run:`` settings (or a resumed run's config.json) fill it,
  else the field's default does.

A command decorated with :func:`run_options` receives them as one dict, ``flags``: the flags given on the command
line, as settings (no None; a list split).  This module imports typer and pydantic, never torch: the console
(``spu-tui``) builds its options from it.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import typer
from pydantic.fields import FieldInfo

from spu_engine.core import config

PANEL = "Run settings"  # the --help panel that lists them, in both commands
SCALARS = (str, int, float, bool, Path)

# What a field cannot say about its flag, by field name: further spellings (a short flag, an old name).
# Each flag's own spelling, --field-name, always stays.
EXTRA_SPELLINGS: dict[str, tuple[str, ...]] = {}


@dataclass(frozen=True)
class RunFlag:
    """One field of the settings as a command-line option."""

    name: str  # the field's name: the keyword the command and the settings share
    type: type  # what the command line parses: one of SCALARS
    listed: bool  # a list setting, given as 'a,b'
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parameter(self) -> inspect.Parameter:
        """The option as typer reads it from a command's signature (keyword-only, after the command's own)."""
        decls = (f"{self.flag}/--no-{self.flag[2:]}",) if self.type is bool else (self.flag,)
        decls += EXTRA_SPELLINGS.get(self.name, ())
        option = typer.Option(None, *decls, help=self.help, rich_help_panel=PANEL, show_default=False)
        kind = inspect.Parameter.KEYWORD_ONLY
        return inspect.Parameter(self.name, kind, default=option, annotation=self.type | None)

    def setting(self, value: Any) -> Any:
        """The value the settings take from what the command line gave ('' as a list: none)."""
        if self.listed:
            return [part.strip() for part in value.split(",") if part.strip()] or ["none"]
        return value


def run_flags() -> list[RunFlag]:
    """The fields of ``config.EngineConfig`` (read when called) as options, in the order the settings declare them."""
    return [_flag(name, field) for name, field in config.EngineConfig.model_fields.items()]


def _flag(name: str, field: FieldInfo) -> RunFlag:
    kind, listed = _command_line_type(name, field.annotation)
    default = _default_text(field)
    help_text = (field.description or "").strip()
    if default is None and not field.is_required() and "default" not in help_text:
        default = "none"  # an empty or unset setting whose description does not say what that means
    if default is not None:
        help_text = f"{help_text} (default: {default})".strip()
    return RunFlag(name, kind, listed, help_text)


def _command_line_type(name: str, annotation: Any) -> tuple[type, bool]:
    """``int | None`` -> (int, False); ``list[str]`` -> (str, True); a type with no command-line form is an error."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        rest = [arg for arg in args if arg is not type(None)]
        if len(rest) == 1:
            return _command_line_type(name, rest[0])
    elif origin is list and args in ((str,), ()):
        return str, True
    elif annotation in SCALARS:
        return annotation, False
    raise TypeError(
        f"setting {name!r}: a {annotation!r} has no command-line form; "
        f"give it one in spu_engine/core/run_options.py (supported: {', '.join(t.__name__ for t in SCALARS)}, list[str])"
    )


def _default_text(field: FieldInfo) -> str | None:
    """The field's default as --help says it; None when there is none to say (None, an empty list, required)."""
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    if value is None or value == []:
        return None
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` every run flag; it receives the ones given as ``flags`` (a dict of settings).

    ``command`` declares ``flags`` and its own options; none of them may be named like a setting.
    """
    flags = run_flags()
    signature = inspect.signature(command, eval_str=True)
    if "flags" not in signature.parameters:
        raise TypeError(f"{command.__name__} takes the run flags as a parameter named 'flags'")
    own = [p for p in signature.parameters.values() if p.name != "flags"]
    clash = sorted({p.name for p in own} & {f.name for f in flags})
    if clash:
        raise TypeError(f"{command.__name__}: {', '.join(clash)} are run settings; leave them to run_options")

    @functools.wraps(command)
    def with_run_flags(*args: Any, **kwargs: Any) -> Any:
        given = {f.name: kwargs.pop(f.name, None) for f in flags}
        settings = {f.name: f.setting(given[f.name]) for f in flags if given[f.name] is not None}
        return command(*args, flags=settings, **kwargs)

    with_run_flags.__signature__ = signature.replace(parameters=[*own, *(f.parameter() for f in flags)])
    return with_run_flags
