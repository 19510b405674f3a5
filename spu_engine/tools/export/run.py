"""``spu export``: a run's newest complete checkpoint as a folder the ecosystem loads, masks folded in.

``export_run`` loads the checkpoint into the run's architecture with the PEFT tensors it added and multiplies every
pruned weight by its mask.  Then, by the run's ``peft.method``:

- none, bitfit, or ``merge=True`` (LoRA / AdaLoRA / (IA)3 merged by peft): ``save_pretrained``, so
  ``AutoModel*.from_pretrained(folder)`` loads it.  ``compact=True`` also removes what pruning killed: FFN neurons
  (``ffn.py``), whole GPT-2 blocks (``blocks.py``) and attention heads (``heads.py``), and compares the compact model
  with the dense one on a probe batch (``probe.py``).
- lora, adalora, ia3: a peft adapter folder (``peft_folder.py``), ``PeftModel.from_pretrained(base, folder)``.
- adapter (Houlsby): the model folder plus ``spu_houlsby.py`` (``save.py``; ``houlsby.load`` without remote code).

Every folder gets ``spu_export.json`` and ``README.md`` (``card.py``), and the tokenizer.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from spu_engine.core.config import recorded
from spu_engine.core.model_source import MINILM_ALIASES, MINILM_HUB_ID, offline_model_dir
from spu_engine.core.policy import Policy
from spu_engine.core.runs import CHECKPOINTS, CONFIG
from spu_engine.model import pooling
from spu_engine.model.loading import AUTO_CLASSES, count_params, load_tokenizer, name_classes
from spu_engine.storage.checkpoint import latest_checkpoint, load_method_tensors
from spu_engine.storage.sharded_checkpoint import is_sharded, read_tensors
from spu_engine.tools.export.blocks import remove_blocks
from spu_engine.tools.export.card import write_card
from spu_engine.tools.export.errors import ExportError
from spu_engine.tools.export.ffn import compact_ffn
from spu_engine.tools.export.heads import compact_attention
from spu_engine.tools.export.peft_folder import write_peft_folder
from spu_engine.tools.export.probe import probe_batch, time_forward
from spu_engine.tools.export.save import save_model
from spu_engine.tools.export.target import prepare, written_aside
from spu_engine.tools.export.weights import MASK_PREFIX, TUNER_METHODS, fold_masks, load_into, merge_tuners


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
    merged_diff: float | None = (
        None  # LoRA / AdaLoRA / (IA)3 merged into the weights vs the adapted model, on the probe batch
    )
    format: str = "model"  # model | peft | houlsby (``card.FORMATS``)
    loaded_diff: float | None = None  # peft folder loaded onto the base vs the run's model, on the probe batch
    notes: list[str] = field(default_factory=list)


def export_run(
    run_dir: Path, out_dir: Path, compact: bool = False, merge: bool = False, force: bool = False
) -> ExportReport:
    """Export ``run_dir`` to ``out_dir`` (``target.py``: never into a run; over a previous export with ``force``)."""
    from spu_engine.loop.engine import EngineConfig
    from spu_engine.tasks import get_task

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg_path = run_dir / CONFIG
    if not cfg_path.exists():
        raise ExportError(f"{run_dir} is not a run folder (no config.json)")
    target, notes = prepare(out_dir, force, run_dir)
    config = EngineConfig(**recorded(json.loads(cfg_path.read_text())))
    kind = get_task(config.task).model_kind
    path = latest_checkpoint(run_dir / CHECKPOINTS, log=notes.append)
    if path is None:
        raise ExportError(
            f"{run_dir}/checkpoints has no complete checkpoint; save one (key 'c' in the console, or "
            "`checkpoint` command) and retry"
        )
    state = json.loads((path / "state.json").read_text())
    peft = Policy.model_validate(state["policy"]).at_step(state["step"]).peft
    form = _format(peft.method, compact, merge)
    sharded = is_sharded(path)  # written by a sharded run: its shards read whole, here, in one process
    tensors = read_tensors(path) if sharded else load_file(str(path / "model.safetensors"))
    method_tensors = read_tensors(path, "methods") if sharded else load_method_tensors(path)
    masks = {k[len(MASK_PREFIX) :]: v for k, v in method_tensors.items() if k.startswith(MASK_PREFIX)}
    model = load_into(config.model, kind, tensors, peft, config.steps, state.get("methods"), config.pooling)
    labels = state.get("label_names")
    name_classes(model, labels)  # `spu eval` maps labels by these names
    masked, zeros = fold_masks(model, masks)  # before a merge: the run masked the base weight, not base + B A
    merged_diff = merge_tuners(model) if merge and peft.method in TUNER_METHODS else None
    report = ExportReport(
        out_dir, path, count_params(model), len(masks), zeros / masked if masked else 0.0, notes=notes, format=form
    )
    report.merged_diff = merged_diff
    if merged_diff is not None:
        notes.append(
            f"{peft.method} merged into the weights: max |difference| of outputs, merged vs unmerged, {merged_diff:.1e}"
        )
    report.dense_params = report.params
    name = str(Path(config.model).resolve()) if Path(config.model).exists() else config.model
    reference = _reference(name)
    info = {
        "format": form,
        "peft_method": peft.method,
        "merged": merged_diff is not None,
        "base_model": name,
        "base_reference": reference,
        "task": config.task,
        "model_kind": kind,
        "labels": labels if getattr(model.config, "num_labels", None) == len(labels or []) else None,
        "max_length": config.max_length,
        "pooling": config.pooling,
        "metric": config.metric,
        "text_column": config.text_column,
        "label_column": config.label_column,
        "run": run_dir.resolve().name,
        "checkpoint": path.name,
        "step": state["step"],
    }
    with written_aside(target, force, run_dir) as folder:
        if form == "peft":
            report.loaded_diff = write_peft_folder(model, name, reference, kind, folder)
            if report.loaded_diff > 1e-3:
                notes.append(
                    f"the adapter folder does not reproduce the run (difference {report.loaded_diff:.1e}): use --merge"
                )
            notes.append(
                f"a peft adapter folder for {reference}: PeftModel.from_pretrained(base, folder) loads it; its outputs "
                f"differ from the run's model by at most {report.loaded_diff:.1e} on a probe batch (--merge writes a plain model)"
            )
            report.params = sum(t.numel() for t in load_file(str(folder / "adapter_model.safetensors")).values())
        else:
            if compact:
                _compact(model, report, notes)
            remote = save_model(model, folder, kind)
            if remote and form == "model" and (folder / "spu_compact.py").exists():
                notes.append(
                    "attention heads were removed: load with from_pretrained(folder, trust_remote_code=True) "
                    "(the code is spu_compact.py in the folder)"
                )
            if form == "houlsby":
                notes.append(
                    f"Houlsby adapters: {AUTO_CLASSES[kind]}.from_pretrained(folder, trust_remote_code=True) (the code is "
                    "spu_houlsby.py in the folder), or spu_engine.tools.export.houlsby.load(folder) without remote code"
                )
            report.params = count_params(model)
        if config.pooling == "mean":
            _mean_pooling_code(folder, form, kind, notes)
        write_card(folder, info, remote=form == "model" and (folder / "spu_compact.py").exists())
        try:
            load_tokenizer(config.model).save_pretrained(folder)
        except Exception as exc:
            notes.append(f"tokenizer not copied ({exc}); copy it from {config.model}")
    return report


def _mean_pooling_code(folder: Path, form: str, kind: str, notes: list[str]) -> None:
    """A peft folder gets ``pooling.py`` to put on its base model (a model folder has it in its remote code)."""
    if form == "peft":
        (folder / "spu_pooling.py").write_text(Path(pooling.__file__).read_text(), encoding="utf-8")
        notes.append("mean pooling: apply mean_pool (spu_pooling.py in the folder) to the base before PeftModel")
    elif form == "model":
        notes.append(
            f"mean pooling: {AUTO_CLASSES[kind]}.from_pretrained(folder, trust_remote_code=True), or "
            "spu_engine.model.pooling.mean_pool(...from_pretrained(folder)) without remote code"
        )


def _format(method: str, compact: bool, merge: bool) -> str:
    """Which folder the run's PEFT method and the flags ask for; ExportError for a combination that cannot be."""
    if method == "adapter":
        if merge:
            raise ExportError(
                "--merge: Houlsby adapters cannot be folded into the weights (a GELU sits between their two "
                "projections); export without --merge: the model folder plus the adapters and their loading code"
            )
        if compact:
            raise ExportError("--compact is not available for a Houlsby-adapter run (its adapters sit in the blocks)")
        return "houlsby"
    if method in TUNER_METHODS and not merge:
        if compact:
            raise ExportError(
                f"--compact needs --merge for a {method} run: an adapter folder applies to the unchanged base model"
            )
        return "peft"
    if merge and method not in TUNER_METHODS:
        raise ExportError(f"--merge is for lora, adalora and ia3 runs; this run's peft.method is {method}")
    return "model"


def _reference(name: str) -> str:
    """The base model as the adapter folder names it for people elsewhere: the hub id behind SPU's offline MiniLM."""
    offline = offline_model_dir()
    if name.lower() in MINILM_ALIASES or (offline is not None and Path(name).resolve() == Path(offline).resolve()):
        return MINILM_HUB_ID
    return name


def _compact(model, report: ExportReport, notes: list[str]) -> None:
    dense = copy.deepcopy(model)
    report.ffn_width = compact_ffn(model)
    report.blocks = remove_blocks(model, notes)
    report.heads = compact_attention(model)
    batch = probe_batch(model.config)
    report.dense_seconds, report.compact_seconds = time_forward(dense, batch), time_forward(model, batch)
    with torch.no_grad():
        report.max_abs_diff = float((dense(**batch)[0] - model(**batch)[0]).abs().max())
