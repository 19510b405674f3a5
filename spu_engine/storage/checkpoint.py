"""Checkpoints that are never half-written.

Layout: ``checkpoints/step-0000200/`` with ``model.safetensors``, ``optimizer.pt``
(loaded with ``weights_only=True``), ``state.json`` and ``manifest.json``
(sha256 of every file).  A checkpoint is written to a hidden temporary folder,
every file fsynced, then renamed into place; a folder whose manifest does not
verify is skipped with a message, so a crash or a full disk mid-write costs at
most that one checkpoint.  Nothing here deletes a checkpoint it cannot use: a
resume moves it to ``checkpoints/unusable/`` with the reason next to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from spu_engine.core.run_guard import MANIFEST
from spu_engine.core.writes import fsync_tree, replace_folder, writing
from spu_engine.model.loading import stable_name

METHOD_TENSORS = "methods.safetensors"
REQUIRED = ("model.safetensors", "optimizer.pt", "state.json")
SHARDED_REQUIRED = ("shards/.metadata", "state.json")  # a sharded run's (``sharded_checkpoint``)
OPTIMIZER = "optimizer.pt"
PREFIX = "step-"
UNUSABLE = "unusable"  # checkpoints a resume could not use, each with a reason.txt
REASON = "reason.txt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the text says which and why."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict by stable names (as loaded, before any PEFT wrapping), shared (tied) storages written once, contiguous, on CPU."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for live, t in model.state_dict().items():
        name = stable_name(live)
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen and t.numel():
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_checkpoint(
    folder: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 3,
    method_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``step-NNNNNNN`` atomically and keep the newest ``keep`` checkpoints.

    Any failure of the writers (a full disk is a RuntimeError from torch.save and a SafetensorError from
    safetensors) raises ``WriteError``; the temporary folder is removed and no complete checkpoint is touched.
    """
    final = folder / f"{PREFIX}{step:07d}"
    tensors = model_tensors(model)
    extra = {k: v.detach().to("cpu").contiguous() for k, v in method_tensors.items()} if method_tensors else None
    optimizer_state = optimizer.state_dict()
    state_text = json.dumps({**state, "step": step}, indent=1)
    with writing(f"writing checkpoint {final.name}", folder):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step:07d}-", dir=folder))
        try:
            save_file(tensors, str(tmp / "model.safetensors"))
            torch.save(optimizer_state, tmp / OPTIMIZER)
            if extra:  # masks, scores, references of methods that keep tensors outside the model
                save_file(extra, str(tmp / METHOD_TENSORS))
            (tmp / "state.json").write_text(state_text)
            seal(tmp, final, step)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for stale in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def seal(tmp: Path, final: Path, step: int) -> None:
    """Finish a checkpoint written into ``tmp``: every file listed in the manifest with its sha256, everything
    fsynced, then renamed to ``final`` (a checkpoint of the same step is swapped out, never deleted first)."""
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[str(f.relative_to(tmp))] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
    fsync_tree(tmp)
    replace_folder(tmp, final, final.with_name(f".old-{final.name}"))


def _step_of(path: Path) -> int | None:
    digits = path.name[len(PREFIX) :]
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders, oldest first (by step number, not by name)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_step_of)


def remove_partial(folder: Path, log: Callable[[str], None] = print) -> None:
    """Clear what a killed writer left behind; only the engine holding the run lock calls this.

    A ``.tmp-`` folder never became a checkpoint and is deleted.  An ``.old-step-N`` folder is the previous copy
    of a step being replaced: if the writer died before the new copy took its name, it is the only copy and is
    put back; otherwise the new one is complete and the old copy goes.
    """
    if not folder.is_dir():
        return
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".old-") and not (folder / p.name[len(".old-") :]).exists():
            os.rename(p, folder / p.name[len(".old-") :])
            log(f"restored checkpoint {p.name[len('.old-') :]} that an interrupted rewrite had set aside")
        elif p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)
            log(f"removed half-written checkpoint {p.name}")


def set_aside(path: Path, reason: str, log: Callable[[str], None] = print) -> Path:
    """Move a checkpoint a resume cannot use to ``checkpoints/unusable/`` with ``reason.txt``: never delete what cannot be read."""
    shelf = path.parent / UNUSABLE
    shelf.mkdir(exist_ok=True)
    dest, n = shelf / path.name, 1
    while dest.exists():
        dest, n = shelf / f"{path.name}.{n}", n + 1
    os.rename(path, dest)
    try:
        (dest / REASON).write_text(reason + "\n")
    except OSError as exc:
        log(f"could not write {dest / REASON} ({exc})")
    log(f"moved unusable checkpoint {path.name} to {dest} ({reason})")
    return dest


def verify(path: Path, ignore: tuple[str, ...] = ()) -> str | None:
    """None if the checkpoint is complete and intact (files in ``ignore`` aside), else the reason it is not."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return "no manifest (incomplete write)"
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {
            name: (int(meta["bytes"]), str(meta["sha256"])) for name, meta in files.items() if name not in ignore
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable manifest ({type(exc).__name__}: {exc})"
    required = SHARDED_REQUIRED if SHARDED_REQUIRED[0] in expected else REQUIRED
    missing = [name for name in required if name not in expected and name not in ignore]
    if missing:
        return f"manifest does not list {', '.join(missing)}"
    for name, (size, digest) in expected.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, manifest says {size} (truncated)"
        if _sha256(f) != digest:
            return f"{name} checksum mismatch (corrupted)"
    return None


def latest_checkpoint(folder: Path, log: Callable[[str], None] = print) -> Path | None:
    """Newest checkpoint that verifies; broken ones are reported through ``log`` and skipped."""
    for path in reversed(list_checkpoints(folder)):
        problem = verify(path)
        if problem is None:
            return path
        log(f"skipping checkpoint {path.name}: {problem}")
    return None


def checkpoint_to_resume(folder: Path, fresh_optimizer: bool = False, log: Callable[[str], None] = print) -> Path:
    """The checkpoint a resume continues from.

    Newest first: one that does not verify is moved to ``unusable/`` with the reason.  One whose weights verify
    but whose optimizer state does not is used only with ``fresh_optimizer``; otherwise the resume stops with a
    CheckpointError naming ``--fresh-optimizer``, keeping every file.  None usable is a CheckpointError too.
    """
    usable = list(reversed(list_checkpoints(folder)))
    for i, path in enumerate(usable):
        problem = verify(path)
        if problem is None:
            return path
        if verify(path, ignore=(OPTIMIZER,)) is None:
            if fresh_optimizer:
                log(
                    f"checkpoint {path.name}: {problem}; its weights verify: resuming with fresh optimizer state (--fresh-optimizer)"
                )
                return path
            older = next((p for p in usable[i + 1 :] if verify(p) is None), None)
            alternative = (
                f", or move {path.name} out of {folder} to resume from {older.name} with its optimizer state"
                if older
                else ""
            )
            raise CheckpointError(
                f"checkpoint {path.name}: {problem}, but its weights verify. Resume from it with fresh optimizer state "
                f"(AdamW moments start from zero): spu train --resume {folder.parent} --fresh-optimizer{alternative}"
            )
        log(f"skipping checkpoint {path.name}: {problem}")
        set_aside(path, problem, log)
    shelf = folder / UNUSABLE
    kept = f"; the unusable ones are kept in {shelf} with the reason" if shelf.is_dir() and any(shelf.iterdir()) else ""
    raise CheckpointError(
        f"no usable checkpoint in {folder}: nothing to resume from{kept}. "
        f"Start the run again from step 0 with: spu train --run-dir {folder.parent} --overwrite (its history is replaced)"
    )


def read_state(path: Path, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Verify the checkpoint (files in ``ignore`` aside) and return its ``state.json`` (step, policy, data position, RNG ...)."""
    problem = verify(path, ignore)
    if problem:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
    try:
        return json.loads((path / "state.json").read_text())
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: state.json is not JSON ({exc})") from None


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Model tensors from safetensors (never pickle); every tensor must fit, tied ones excepted."""
    live = {stable_name(n): n for n in model.state_dict()}
    tensors = {live.get(stable_name(n), n): t for n, t in load_file(str(path / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [n for n in missing if not _is_tied(model, n, tensors)]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load_method_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors methods saved with the checkpoint (``method_tensors``); empty if there are none."""
    f = path / METHOD_TENSORS
    return load_file(str(f)) if f.exists() else {}


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state through ``torch.load(weights_only=True)``: tensors and plain containers, never arbitrary objects."""
    try:
        state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path}: optimizer.pt holds more than tensors; refused ({_first_line(exc)})"
        ) from None
    try:
        optimizer.load_state_dict(state)
    except ValueError as exc:  # different parameter groups: another policy or model
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit ({exc})") from None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Verify, then load weights (and optimizer state); returns ``state.json``."""
    state = read_state(path)
    load_weights(path, model)
    if optimizer is not None:
        load_optimizer(path, optimizer)
    return state


def load_optimizer_or_fresh(
    path: Path, optimizer: torch.optim.Optimizer, fresh_optimizer: bool, run: Path
) -> str | None:
    """Load the optimizer state, or, when the user accepts it (``fresh_optimizer``) and it is missing or unusable,
    clear it and return why; without the flag an unusable one is a CheckpointError naming the flag."""
    problem = verify(path) if fresh_optimizer else None
    if problem is None:
        try:
            load_optimizer(path, optimizer)
            return None
        except CheckpointError as exc:
            if not fresh_optimizer:
                raise CheckpointError(
                    f"{exc}. Its weights verify: resume from them with fresh optimizer state: spu train --resume {run} --fresh-optimizer"
                ) from None
            problem = str(exc)
    optimizer.state.clear()  # whatever a failed load left: every tensor starts from zero moments
    return problem


def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from (torch, Python, each CUDA device), as JSON-able lists."""
    return {
        "torch": torch.get_rng_state().tolist(),
        "python": random.getstate(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    if "python" in rng:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])


def method_tensors(methods: list[Any]) -> dict[str, torch.Tensor]:
    """The tensors methods keep (masks, scores), each named ``MethodClass/key``."""
    return {f"{type(m).__name__}/{k}": v for m in methods for k, v in m.tensor_state().items()}


def restore_method_tensors(methods: list[Any], tensors: dict[str, torch.Tensor]) -> None:
    for m in methods:
        prefix = f"{type(m).__name__}/"
        m.load_tensor_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})


def _first_line(exc: Exception) -> str:
    return str(exc).strip().split("\n")[0][:200]


def _is_tied(model: torch.nn.Module, name: str, saved: dict[str, torch.Tensor]) -> bool:
    sd = model.state_dict()
    ptr = sd[name].untyped_storage().data_ptr()
    return any(n in saved and sd[n].untyped_storage().data_ptr() == ptr for n in sd if n != name)
