"""The pooling a checkpoint was trained for, read from its folder: the default of the ``pooling`` run setting.

A sentence-transformers folder lists its modules in ``modules.json``; its ``sentence_transformers.models.Pooling``
module's ``config.json`` says ``pooling_mode_mean_tokens`` or ``pooling_mode_cls_token``.  A folder SPU exported
says ``spu_pooling`` in its ``config.json``.  Anything else (a plain BERT folder, a hub id not in the local cache) was
trained, as far as the folder says, through [CLS]: ``cls``.  Light (json only; huggingface_hub's cache lookup, never
a download), so the settings can resolve it before torch loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from spu_engine.core.model_source import resolve_model_name

ST_POOLING = "sentence_transformers.models.Pooling"
ST_MODES = (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"))


def checkpoint_pooling(model: str) -> tuple[str, str]:
    """(``cls`` | ``mean``, why): the pooling ``model``'s folder (or its hub snapshot in the local cache) says."""
    name = resolve_model_name(model)
    read = _reader(name)
    own = _json(read("config.json"))
    if isinstance(own, dict) and own.get("spu_pooling") in ("cls", "mean"):
        return own["spu_pooling"], f"{name}'s config.json says spu_pooling: {own['spu_pooling']} (an SPU export)"
    modules = _json(read("modules.json"))
    for module in modules if isinstance(modules, list) else []:
        if isinstance(module, dict) and module.get("type") == ST_POOLING:
            where = f"{module.get('path') or '.'}/config.json"
            settings = _json(read(where))
            for key, mode in ST_MODES:
                if isinstance(settings, dict) and settings.get(key) is True:
                    return mode, f"the checkpoint was trained for it: {name}'s {where} says {key}: true"
            said = settings if isinstance(settings, dict) else {}
            found = ", ".join(k for k, v in said.items() if k.startswith("pooling_mode") and v is True)
            return "cls", f"{name}'s {where} pools by {found or 'nothing SPU knows'}, which SPU lacks; [CLS] instead"
    return "cls", f"{name} names no pooling of its own (no sentence-transformers modules.json): [CLS]"


def pooling_note(model: str, pooling: str) -> str:
    """The run's pooling and why, for its log: the checkpoint's own, or the setting that overrides it."""
    own, why = checkpoint_pooling(model)
    if own == pooling:
        return f"pooling: {pooling} ({why})"
    return f"pooling: {pooling}, set by the run's pooling setting (the checkpoint's own is {own}: {why})"


def _reader(name: str):
    """A function reading one file of the model (None when absent): from its folder, else from the hub cache."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return lambda file: _text(folder / file)

    def cached(file: str) -> str | None:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, file)
        except Exception:  # not a repo id, no cache: nothing said
            return None
        return _text(Path(found)) if isinstance(found, str) else None

    return cached


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _json(text: str | None):
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None
