"""``spu export``: a run's newest complete checkpoint as a standard Hugging Face folder, masks folded in.

``export_run`` loads the checkpoint into the run's architecture, merges LoRA / AdaLoRA, multiplies every pruned
weight by its mask and writes ``config.json``, ``model.safetensors`` and the tokenizer with ``save_pretrained``,
so ``AutoModel*.from_pretrained(folder)`` loads it.  ``compact=True`` also removes what pruning killed: FFN
neurons (``ffn.py``), whole GPT-2 blocks (``blocks.py``) and attention heads (``heads.py``), and compares the
compact model with the dense one on a probe batch (``probe.py``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from spu_engine.core.policy import Policy
from spu_engine.core.runs import CHECKPOINTS, CONFIG
from spu_engine.model.loading import count_params, load_tokenizer, name_classes
from spu_engine.storage.checkpoint import latest_checkpoint, load_method_tensors
from spu_engine.storage.sharded_checkpoint import is_sharded, read_tensors
from spu_engine.tools.export.blocks import remove_blocks
from spu_engine.tools.export.errors import ExportError
from spu_engine.tools.export.ffn import compact_ffn
from spu_engine.tools.export.heads import compact_attention
from spu_engine.tools.export.probe import probe_batch, time_forward
from spu_engine.tools.export.save import save_model
from spu_engine.tools.export.weights import LORA_METHODS, MASK_PREFIX, fold_masks, load_into, merge_lora


@dataclass
class ExportReport:
    out_dir: Path
    checkpoint: Path
    params: int
    masked_tensors: int
    sparsity: float  # zeros among the masked tensors
    ffn_width: tuple[int, int] | None = None  # (before, after) with --compact
    blocks: tuple[int, int] | None = None  # number of blocks (before, after) with --compact
    heads: tuple[int, int] | None = None  # attention heads over all blocks (before, after) with --compact
    dense_params: int = 0
    dense_seconds: float | None = None  # CPU forward time on a probe batch, dense vs compact
    compact_seconds: float | None = None
    max_abs_diff: float | None = None  # compact vs dense outputs on the probe batch
    merged_diff: float | None = None  # LoRA / AdaLoRA merged into the weights vs the adapted model, on the probe batch
    notes: list[str] = field(default_factory=list)


def export_run(run_dir: Path, out_dir: Path, compact: bool = False) -> ExportReport:
    from spu_engine.loop.engine import EngineConfig
    from spu_engine.tasks import get_task

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg_path = run_dir / CONFIG
    if not cfg_path.exists():
        raise ExportError(f"{run_dir} is not a run folder (no config.json)")
    config = EngineConfig(**json.loads(cfg_path.read_text()))
    kind = get_task(config.task).model_kind
    notes: list[str] = []
    path = latest_checkpoint(run_dir / CHECKPOINTS, log=notes.append)
    if path is None:
        raise ExportError(
            f"{run_dir}/checkpoints has no complete checkpoint; save one (key 'c' in the console, or "
            "`checkpoint` command) and retry"
        )
    sharded = is_sharded(path)  # written by a sharded run: its shards read whole, here, in one process
    tensors = read_tensors(path) if sharded else load_file(str(path / "model.safetensors"))
    method_tensors = read_tensors(path, "methods") if sharded else load_method_tensors(path)
    masks = {k[len(MASK_PREFIX) :]: v for k, v in method_tensors.items() if k.startswith(MASK_PREFIX)}
    state = json.loads((path / "state.json").read_text())
    peft = Policy.model_validate(state["policy"]).at_step(state["step"]).peft
    model = load_into(config.model, kind, tensors, peft, config.steps)
    merged_diff = merge_lora(model) if peft.method in LORA_METHODS else None
    name_classes(model, state.get("label_names"))  # `spu eval` maps labels by these names
    masked, zeros = fold_masks(model, masks)
    report = ExportReport(
        out_dir,
        path,
        count_params(model),
        len(masks),
        zeros / masked if masked else 0.0,
        notes=notes,
        merged_diff=merged_diff,
    )
    if merged_diff is not None:
        notes.append(
            f"{peft.method} merged into the weights: max |difference| of outputs, merged vs unmerged, {merged_diff:.1e}"
        )
    report.dense_params = report.params
    if compact:
        dense = copy.deepcopy(model)
        report.ffn_width = compact_ffn(model)
        report.blocks = remove_blocks(model, notes)
        report.heads = compact_attention(model)
        batch = probe_batch(model.config)
        report.dense_seconds, report.compact_seconds = time_forward(dense, batch), time_forward(model, batch)
        with torch.no_grad():
            report.max_abs_diff = float((dense(**batch)[0] - model(**batch)[0]).abs().max())
    out_dir.mkdir(parents=True, exist_ok=True)
    if save_model(model, out_dir, kind):
        notes.append(
            "attention heads were removed: load with from_pretrained(folder, trust_remote_code=True) "
            "(the code is spu_compact.py in the folder)"
        )
    report.params = count_params(model)
    try:
        load_tokenizer(config.model).save_pretrained(out_dir)
    except Exception as exc:
        notes.append(f"tokenizer not copied ({exc}); copy it from {config.model}")
    return report
