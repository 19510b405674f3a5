"""What a checkpoint of a run holds, and how a run comes back from one.

Weights, optimizer and method tensors go through ``storage.checkpoint`` (never half-written); beside them the
policy with its timeline, pending entries and triggers, each method's state, the data position, the RNG and the
settings, so a resumed run takes the same next steps as the run that wrote it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from spu_engine.core.policy import Policy, TimelineEntry
from spu_engine.model.loading import stable_name
from spu_engine.model.sharded import laid_out_like
from spu_engine.storage import checkpoint as ckpt
from spu_engine.storage.sharded_checkpoint import is_sharded, load_sharded, save_sharded


def save_run(engine) -> Path:
    """A checkpoint of ``engine``'s run at its current step; the ``checkpoint`` event says where."""
    state = {
        "policy": engine.record.initial_policy.model_copy(update={"timeline": engine.record.recorded}).model_dump(
            mode="json", exclude_none=True
        ),
        "pending": [e.model_dump(mode="json", exclude_none=True) for e in engine.pending],
        "triggers": [e.model_dump(mode="json", exclude_none=True) for e in engine.triggers],
        "metric_range": engine.metric_range,
        "stream": engine.stream.state_dict(),
        "samples_seen": engine.samples_seen,
        "config": engine.config.model_dump(),
        # the label of each class id: `spu eval` maps new data by it
        "label_names": getattr(engine.task, "label_names", None),
        "methods": {type(m).__name__: m.state_dict() for m in engine.methods},
        "warm_from": engine.warm_from,
        "rng": ckpt.rng_state(),
        "scaler": engine.scaler.state_dict() if engine.scaler else None,
        "world_size": engine.dist.world_size if engine.dist else 1,
    }
    if engine.dist is not None:  # every rank writes its shards; rank 0 the rest
        path = save_sharded(
            engine.checkpoints,
            engine.step,
            engine.model,
            engine.optimizer,
            state,
            engine.config.keep_checkpoints,
            ckpt.method_tensors(engine.methods),
            engine.dist,
            set().union(*(m.parked_tensors() for m in engine.methods)),
        )
    else:
        path = ckpt.save_checkpoint(
            engine.checkpoints,
            engine.step,
            engine.model,
            engine.optimizer,
            state,
            keep=engine.config.keep_checkpoints,
            method_tensors=ckpt.method_tensors(engine.methods),
        )
    engine.saved = (engine.step, path)
    engine.emit("checkpoint", step=engine.step, path=str(path))
    return path


def resume_run(engine, path: Path, fresh_optimizer: bool = False) -> None:
    """Policy (with timeline), method state, weights, optimizer, data position and RNG from a checkpoint.

    ``fresh_optimizer``: the user accepts fresh optimizer state when the checkpoint's is missing or unusable
    (the weights must verify all the same); without it such a checkpoint is a CheckpointError naming the flag.
    """
    state = ckpt.read_state(path, ignore=(ckpt.OPTIMIZER,) if fresh_optimizer else ())
    policy = Policy.model_validate(state["policy"])
    rt = engine.runtime
    engine.record.initial_policy = policy.sections()
    engine.record.recorded = list(policy.timeline)
    rt.pending = [TimelineEntry.model_validate(e) for e in state["pending"]]
    # the triggers with the steps they fired at
    rt.triggers = [TimelineEntry.model_validate(e) for e in state.get("triggers", [])]
    rt.metric_range = state.get("metric_range", {})
    engine.progress.step = state["step"]
    rt.current = policy.at_step(engine.step)
    rt.configure_methods(rt.current)  # before the weights: a method may add tensors (adapters, LoRA)
    for m in engine.methods:
        m.load_state_dict(state.get("methods", {}).get(type(m).__name__, {}))
    rt.apply_trainable()
    engine.lr_groups.warm_from = dict(state.get("warm_from", {}))
    engine.lr_groups.regroup()  # the groups the checkpoint's optimizer state was saved with
    if is_sharded(path):  # written by a sharded run, at any world size
        ckpt.restore_method_tensors(engine.methods, load_sharded(path, engine.model, engine.optimizer))
    else:
        _load_whole(engine, path, fresh_optimizer)
    if engine.scaler and state.get("scaler"):
        engine.scaler.load_state_dict(state["scaler"])
    engine.stream.load_state_dict(state["stream"])
    _say_global_batch(engine, state)
    engine.trainer.samples_seen = state.get("samples_seen", 0)
    ckpt.restore_rng(state["rng"])
    # readers of events.jsonl drop the events after this step that the lost process wrote (runs.read_history)
    engine.emit(
        "resumed", step=engine.step, checkpoint=str(path), message=f"resumed from {path.name} at step {engine.step}"
    )


def _load_whole(engine, path: Path, fresh_optimizer: bool) -> None:
    """Weights, optimizer state and method tensors from a checkpoint a single process wrote (into a sharded model
    too: each rank reads the file and keeps its shards)."""
    if engine.dist is None:
        ckpt.load_weights(path, engine.model)
    else:
        live = {stable_name(n): n for n in engine.model.state_dict()}
        tensors = {live.get(n, n): t for n, t in load_file(str(path / "model.safetensors")).items()}
        options = StateDictOptions(full_state_dict=True, strict=False)  # planned tensors are not in the file
        set_model_state_dict(engine.model, tensors, options=options)
    problem = ckpt.load_optimizer_or_fresh(
        path, engine.optimizer, fresh_optimizer, engine.run_dir or path.parent.parent
    )
    if problem:
        engine.log(
            f"{path.name}: optimizer state not used ({problem}); AdamW starts afresh (--fresh-optimizer)", "warning"
        )
    for param, state in engine.optimizer.state.items():  # whole moments, each rank keeping its parameter's shards
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim():
                state[key] = laid_out_like(value.to(param.device), param)
    ckpt.restore_method_tensors(engine.methods, ckpt.load_method_tensors(path))


def _say_global_batch(engine, state: dict) -> None:
    """A resume at another world size keeps the per-rank batch, so the global batch (what the arithmetic and the
    learning rate were tuned for) changes unless --batch-size says otherwise: said, with the value that keeps it."""
    before = int(state.get("world_size", 1))
    now = engine.dist.world_size if engine.dist else 1
    per_rank = int(state.get("config", {}).get("batch_size", engine.config.batch_size))
    if before == now or per_rank * before == engine.config.batch_size * now:
        return
    keep = per_rank * before / now
    hint = f"--batch-size {int(keep)} keeps it" if keep == int(keep) else "no whole --batch-size per rank keeps it"
    engine.log(
        f"resumed on {now} rank(s) from a checkpoint of {before}: the global batch is now "
        f"{engine.config.batch_size * now} (it was {per_rank * before}); {hint}",
        "warning",
    )
