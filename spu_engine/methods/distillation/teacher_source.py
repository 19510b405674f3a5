"""Whether a distillation teacher can be found, checked when the policy is (at load), not at the step that switches
it on: a run that trains for hours and then stops on a typo in a folder name has wasted them."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, try_to_load_from_cache

from spu_engine.core.model_source import ModelLoadError, check_source
from spu_engine.methods.distillation.settings import Distillation


def teacher_problem(kd: Distillation) -> str | None:
    """Why the teacher ``kd`` names cannot be loaded (a folder that is not there, a hub id neither cached nor
    reachable with the hub offline), or None; the teacher itself is loaded when distillation switches on."""
    if not kd.enabled or kd.teacher == "initial":
        return None
    try:
        check_source(kd.teacher)  # a local path must exist and hold config.json; anything else is a hub id
    except ModelLoadError as exc:
        return str(exc)
    if not constants.HF_HUB_OFFLINE or _is_path(kd.teacher):
        return None
    try:
        cached = try_to_load_from_cache(kd.teacher, "config.json")
    except ValueError:  # not even a hub id's shape (HFValidationError)
        cached = None
    if isinstance(cached, str):
        return None
    return f"{kd.teacher!r} is not a local folder and not in the Hugging Face cache, and the hub is offline (HF_HUB_OFFLINE)"


def _is_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
