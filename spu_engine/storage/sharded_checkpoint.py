"""Checkpoints of a sharded run (FSDP2): each rank writes its own shards, through ``torch.distributed.checkpoint``.

Layout: ``checkpoints/step-0000200/`` with ``shards/`` (DCP's ``.metadata`` and one ``.distcp`` file per rank:
model, optimizer and method tensors, by parameter name), ``state.json`` and ``manifest.json``, written as a
single-process checkpoint is (``storage.checkpoint``): into a hidden folder, every file fsynced and listed with
its sha256, then renamed into place by rank 0 once every rank has written.  DCP reshards on load, so a run resumes
at any world size, one process included, and ``spu export`` reads it without a process group.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    set_model_state_dict,
)

from spu_engine.core.writes import WriteError, describe, writing
from spu_engine.model.loading import stable_name
from spu_engine.storage.checkpoint import PREFIX, CheckpointError, list_checkpoints, seal

SHARDS = "shards"
METADATA = f"{SHARDS}/.metadata"


def is_sharded(path: Path) -> bool:
    return (path / METADATA).is_file()


def save_sharded(
    folder: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    method_tensors: dict[str, torch.Tensor],
    dist: Any,
    parked: set[str] = frozenset(),
) -> Path:
    """Every rank calls this at the same boundary; rank 0 finishes the folder.  A failure on any rank is a
    ``WriteError`` on every rank (the temporary folder is removed, no complete checkpoint touched).  ``parked``:
    planned tensors not switched on yet, left out (a resume builds them again from the seed)."""
    final = folder / f"{PREFIX}{step:07d}"
    made: str | tuple[str, str] | None = None  # the folder, or a failure's (message, remedy)
    if dist.is_main:
        try:
            with writing(f"writing checkpoint {final.name}", folder):
                folder.mkdir(parents=True, exist_ok=True)
                made = tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step:07d}-", dir=folder)
        except WriteError as exc:
            made = (str(exc), exc.remedy)
    made = dist.broadcast(made)
    if isinstance(made, tuple):
        raise WriteError(*made)
    tmp = Path(made)
    content = {
        "model": {k: v for k, v in _stable(get_model_state_dict(model)).items() if k not in parked},
        "optimizer": optimizer_content(model, optimizer),
        "methods": method_tensors,
    }
    problem: tuple[str, str] | None = None  # a failure's (message, remedy), the same on every rank
    try:
        with writing(f"writing checkpoint {final.name}", folder):  # says a read-only folder as one, not as space
            dcp.save(content, checkpoint_id=str(tmp / SHARDS))
    except WriteError as exc:  # DCP gathers every rank's outcome: all ranks land here together
        problem = (str(exc), exc.remedy)
    dist.barrier()
    if dist.is_main and problem is None:
        try:
            with writing(f"writing checkpoint {final.name}", folder):
                (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
                seal(tmp, final, step)
        except WriteError as exc:
            problem = (str(exc), exc.remedy)
    problem = dist.broadcast(problem)
    if problem is not None:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(*problem)
    if dist.is_main:
        for stale in list_checkpoints(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Weights and optimizer state into ``model`` and ``optimizer`` (sharded or not, at any world size); returns the
    method tensors in full, for the methods to take their part (``load_tensor_state``)."""
    weights = get_model_state_dict(model)
    live = {stable_name(k): k for k in weights}
    content: dict[str, Any] = {"model": _stable(weights), "methods": _templates(path, "methods")}
    prefix = "optimizer.state."  # then the parameter's key, then the state's own (exp_avg, step, ...)
    saved = {k[len(prefix) :].rsplit(".", 1)[0] for k in _metadata(path).state_dict_metadata if k.startswith(prefix)}
    _make_state(model, optimizer, saved)
    content["optimizer"] = optimizer_content(model, optimizer)
    try:  # tensors the checkpoint lacks keep their values: a method's planned tensors that had not been built then
        dcp.load(content, checkpoint_id=str(path / SHARDS), planner=DefaultLoadPlanner(allow_partial_load=True))
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this run ({describe(exc)})") from None
    set_model_state_dict(model, {live[k]: v for k, v in content["model"].items()})
    groups = content["optimizer"]["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"checkpoint {path}: its optimizer has {len(groups)} parameter groups, this run {len(optimizer.param_groups)}"
        )
    for group, loaded in zip(optimizer.param_groups, groups):
        group.update({k: v for k, v in loaded.items() if k != "params"})
    return content["methods"]


def _stable(tensors: dict[str, Any]) -> dict[str, Any]:
    """By stable name (as loaded, before PEFT wrapped a module), so a checkpoint fits whether or not a planned
    method's wrappers were in the model that wrote it."""
    return {stable_name(k): v for k, v in tensors.items()}


def optimizer_content(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state by parameter: a model's tensor by its stable name, one a method keeps outside the model
    (movement's scores) by its group's name and place; its groups' settings.  (``get_optimizer_state_dict`` names
    only the model's own parameters.)  The state tensors themselves, so a load writes into them."""
    names = {id(p): stable_name(n) for n, p in model.named_parameters()}
    state, groups = {}, []
    for index, group in enumerate(optimizer.param_groups):
        keys = [names.get(id(p), f"{group.get('name', index)}:{i}") for i, p in enumerate(group["params"])]
        state.update({key: dict(optimizer.state[p]) for key, p in zip(keys, group["params"]) if p in optimizer.state})
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": keys})
    return {"state": state, "param_groups": groups}


def _make_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, keys: set[str]) -> None:
    """AdamW state for the parameters a checkpoint has state for, so a load has tensors to write into: a step of
    zero gradients at learning rate 0 (weights unchanged; the state's values are then overwritten)."""
    content = optimizer_content(model, optimizer)
    wanted = set()
    for group, listed in zip(optimizer.param_groups, content["param_groups"]):
        wanted |= {
            id(p) for p, key in zip(group["params"], listed["params"]) if key in keys and p not in optimizer.state
        }
    if not wanted:
        return
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    kept = {p: p.grad for group in optimizer.param_groups for p in group["params"]}
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p) if id(p) in wanted else None
    optimizer.step()
    for p, grad in kept.items():
        p.grad = grad
    for group, lr in zip(optimizer.param_groups, rates):
        group["lr"] = lr


def read_tensors(path: Path, part: str = "model") -> dict[str, torch.Tensor]:
    """The full tensors of ``part`` (``model``: by stable name; ``methods``), read in this process alone."""
    tensors = _templates(path, part)
    if tensors:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({part: tensors}, checkpoint_id=str(path / SHARDS), no_dist=True)
    return {stable_name(k): v for k, v in tensors.items()} if part == "model" else tensors


def _templates(path: Path, part: str) -> dict[str, torch.Tensor]:
    """Empty full-size CPU tensors for every tensor of ``part`` the checkpoint holds, from its metadata."""
    metadata = _metadata(path)
    prefix = f"{part}."
    out = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and hasattr(meta, "size"):
            out[key[len(prefix) :]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    return out


def _metadata(path: Path):
    return dcp.FileSystemReader(str(path / SHARDS)).read_metadata()
