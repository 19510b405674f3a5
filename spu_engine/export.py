"""Export a run's model as a standard Hugging Face folder, pruning masks folded in.

``export_run`` takes the newest complete checkpoint of a run folder, loads it
into the run's architecture, multiplies every pruned weight by its mask and
writes ``config.json``, ``model.safetensors`` and the tokenizer with
``save_pretrained``, so ``AutoModel*.from_pretrained(folder)`` loads it.

``compact=True`` also removes what pruning killed, so the saved model is
physically smaller and faster:

- FFN neurons whose output column is all zero.  A neuron whose input row
  is all zero still outputs a constant, act(its input bias), into its column:
  that constant times the column is added to the output bias first, and the
  column zeroed, so it goes too (the outputs change by float rounding only).
  Every block keeps the same width (the widest block's live neurons; narrower
  blocks keep a few all-zero neurons) because the stock configs have one
  ``intermediate_size``; the folder stays loadable without custom code.
- Whole GPT-2 blocks whose every attention head and FFN neuron is dead.  In
  a pre-LN block the LayerNorms sit inside the two branches, so such a block
  computes x + b_attn + b_ffn (its two output biases) for every input x: it is
  dropped, ``n_layer`` lowered, and that constant added to the FFN output bias
  of the block before it (to the position embeddings for a leading block), so
  the outputs stay equal up to float rounding.  A post-LN block (BERT and its
  family) is never dropped: whatever its weights, it still applies its two
  LayerNorms to the residual stream, and LN2(LN1(x)) = x holds for no setting
  of them (a LayerNorm's output has its own mean and scale, and eps > 0), so
  removing it would change the outputs; the export says so in a note.
- Attention heads (output-projection columns all zero, or value weights and
  bias all zero), per block; one head stays where all died.  Stock configs
  cannot say "a different number of heads per layer", so when any head goes
  the folder also gets ``spu_compact.py`` (``compact_heads.py`` plus a
  subclass of the model's class) named in ``auto_map``:
  ``from_pretrained(folder, trust_remote_code=True)`` loads it.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import compact_heads
from .checkpoint import latest_checkpoint, load_method_tensors
from .compact_heads import dead_heads, head_count, keep_heads, slice_layer
from .methods.pruning.layout import ffn_layers
from .methods.peft.lora import lora_config
from .methods.peft.adalora import inject_adalora
from .methods.peft.inject import eject, inject
from .model import AUTO_CLASSES, count_params, find_block_list, load_model, load_tokenizer, name_classes, stable_name
from .policy import Peft, Policy
from .runs import CHECKPOINTS, CONFIG

MASK_PREFIX = "PruningMethod/mask."
LORA_METHODS = ("lora", "adalora")
FFN_WIDTH_KEYS = ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim", "d_ff", "ffn_hidden_size")


class ExportError(ValueError):
    """The run cannot be exported; the message says why and what to do."""


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
    from .engine import EngineConfig
    from .tasks import get_task

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg_path = run_dir / CONFIG
    if not cfg_path.exists():
        raise ExportError(f"{run_dir} is not a run folder (no config.json)")
    config = EngineConfig(**json.loads(cfg_path.read_text()))
    notes: list[str] = []
    path = latest_checkpoint(run_dir / CHECKPOINTS, log=notes.append)
    if path is None:
        raise ExportError(f"{run_dir}/checkpoints has no complete checkpoint; save one (key 'c' in the console, or `checkpoint` command) and retry")
    tensors = load_file(str(path / "model.safetensors"))
    masks = {k[len(MASK_PREFIX) :]: v for k, v in load_method_tensors(path).items() if k.startswith(MASK_PREFIX)}
    state = json.loads((path / "state.json").read_text())
    peft = Policy.model_validate(state["policy"]).at_step(state["step"]).peft
    model = _load_into(config.model, get_task(config.task).model_kind, tensors, peft, config.steps)
    merged_diff = merge_lora(model) if peft.method in LORA_METHODS else None
    name_classes(model, state.get("label_names"))  # `spu eval` maps labels by these names
    masked, zeros = fold_masks(model, masks)
    report = ExportReport(out_dir, path, count_params(model), len(masks), zeros / masked if masked else 0.0, notes=notes, merged_diff=merged_diff)
    if merged_diff is not None:
        notes.append(f"{peft.method} merged into the weights: max |difference| of outputs, merged vs unmerged, {merged_diff:.1e}")
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
    if save_model(model, out_dir, get_task(config.task).model_kind):
        notes.append("attention heads were removed: load with from_pretrained(folder, trust_remote_code=True) (the code is spu_compact.py in the folder)")
    report.params = count_params(model)
    try:
        load_tokenizer(config.model).save_pretrained(out_dir)
    except Exception as exc:  # noqa: BLE001 - the weights are exported; say what is missing
        notes.append(f"tokenizer not copied ({exc}); copy it from {config.model}")
    return report


def _load_into(name: str, kind: str, tensors: dict[str, torch.Tensor], peft: Peft | None = None, steps: int | None = None) -> nn.Module:
    """The run's architecture with the checkpoint's weights (num_labels read off the checkpoint's head); LoRA and
    AdaLoRA are put in as the run had them (their tensors are the checkpoint's, so no initialisation matters)."""
    model = load_model(name, kind)
    own = model.state_dict()
    mismatched = [n for n, t in tensors.items() if n in own and own[n].shape != t.shape]
    if mismatched and kind == "classification":
        model = load_model(name, kind, num_labels=tensors[mismatched[0]].shape[0])
    if peft is not None and peft.method in LORA_METHODS:
        with torch.random.fork_rng(devices=[]):
            if peft.method == "lora":
                inject(model, lora_config(model, peft, init=True), "peft")
            else:
                inject_adalora(model, peft, steps)
    own = {stable_name(n): t for n, t in model.state_dict().items()}
    live = {stable_name(n): n for n in model.state_dict()}
    mismatched = [n for n, t in tensors.items() if n in own and own[n].shape != t.shape]
    unexpected = [n for n in tensors if n not in own]
    if mismatched or unexpected:
        raise ExportError(
            f"the checkpoint does not fit {name}: "
            + (f"tensors of another shape {mismatched[:3]} " if mismatched else "")
            + (f"tensors the model lacks {unexpected[:3]} (adapters and (IA)3 are not folded by export)" if unexpected else "")
        )
    model.load_state_dict({live[n]: t for n, t in tensors.items()}, strict=False)
    return model.eval()


@torch.no_grad()
def merge_lora(model: nn.Module) -> float:
    """Merge every LoRA / AdaLoRA layer into its base weight (peft's ``merge``: DoRA's magnitude, rsLoRA's scaling,
    AdaLoRA's kept singular values; after PiSSA the base holds the residual, so the merge gives the trained W) and
    drop the adapters; the largest output difference, merged vs adapted, on a probe batch."""
    batch = probe_batch(model.config, length=32)
    before = model(**batch)[0]
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    eject(model)
    return float((model(**batch)[0] - before).abs().max())


@torch.no_grad()
def fold_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Multiply each masked weight by its mask; returns (masked entries, zeros among them)."""
    params = dict(model.named_parameters())
    total = zeros = 0
    for name, keep in masks.items():
        if name not in params:
            raise ExportError(f"mask for {name!r}, which this model does not have")
        p = params[name]
        p.mul_(keep.to(p.device, p.dtype))
        total += p.numel()
        zeros += int((p == 0).sum())
    return total, zeros


# --------------------------------------------------------------------------- compact


def _ffn_modules(block: nn.Module) -> tuple[list[nn.Module], nn.Module, list[tuple[nn.Module, str, nn.Module]]] | None:
    """The FFN input modules, the output module, and (parent, attribute, module) for each, in one block."""
    found = ffn_layers(block)
    if found is None:
        return None
    ins, out = found
    places = []
    for path in [*ins, out]:
        parent, _, attr = path.rpartition(".")
        places.append((block.get_submodule(parent), attr, block.get_submodule(path)))
    return [block.get_submodule(p) for p in ins], block.get_submodule(out), places


def _neuron_rows(module: nn.Module, side: str) -> torch.Tensor:
    """The weight with one row per FFN neuron: output side of an input module, input side of the output module."""
    w = module.weight
    if isinstance(module, Conv1D):  # weight is [in, out]
        return w.t() if side == "out" else w
    return w if side == "out" else w.t()


ACTIVATIONS = ("intermediate_act_fn", "act", "activation", "act_fn")  # BERT, GPT-2, DistilBERT, Llama: on the FFN input's parent


@torch.no_grad()
def fold_constant_neurons(ins: list[nn.Module], out: nn.Module, activation) -> int:
    """Neurons whose input row is all zero output act(bias) whatever the input: add act(bias) times their column to
    the output bias and zero the column, so they are dead.  One input layer (not gated) and an output bias (or a
    constant of zero) only.  Returns how many columns were folded."""
    if len(ins) != 1 or activation is None:
        return 0
    (up,) = ins
    silent = (_neuron_rows(up, "out") == 0).all(dim=1)
    if not silent.any():
        return 0
    bias = up.bias if up.bias is not None else torch.zeros(silent.numel(), dtype=up.weight.dtype, device=up.weight.device)
    constant = activation(bias[silent])  # [n silent]
    columns = _neuron_rows(out, "in")  # [neurons, hidden], a view of the weight
    folded = silent & (columns != 0).any(dim=1)
    if out.bias is None:  # nowhere to put a constant: only those of zero go
        zero = torch.zeros_like(silent)
        zero[silent] = constant == 0
        folded &= zero
    else:
        out.bias += (constant[:, None] * columns[silent]).sum(0)
    columns[folded] = 0
    return int(folded.sum())


def _activation(places: list[tuple[nn.Module, str, nn.Module]]):
    """The FFN's activation function, found next to its input layer; None if it has none of the known names."""
    parent = places[0][0]
    return next((fn for name in ACTIVATIONS if callable(fn := getattr(parent, name, None))), None)


def _dead_neurons(ins: list[nn.Module], out: nn.Module) -> torch.Tensor:
    """Neurons that contribute nothing: zero output column, or a zero input row with zero bias (act(0) = 0 for the
    activations of these models; a single-input FFN's silent neurons were folded into zero columns already)."""
    dead = (_neuron_rows(out, "in") == 0).all(dim=1)
    for m in ins:
        silent = (_neuron_rows(m, "out") == 0).all(dim=1)
        if m.bias is not None:
            silent &= m.bias == 0
        dead |= silent
    return dead


@torch.no_grad()
def compact_ffn(model: nn.Module) -> tuple[int, int]:
    """Remove dead FFN neurons, keeping one width for all blocks; returns (old width, new width)."""
    _, blocks = find_block_list(model)
    found = [_ffn_modules(b) for b in blocks]
    if any(f is None for f in found):
        raise ExportError(f"--compact: cannot find the FFN input/output layers of {type(model).__name__}'s blocks")
    for ins, out, places in found:
        fold_constant_neurons(ins, out, _activation(places))
    dead = [_dead_neurons(ins, out) for ins, out, _ in found]
    old = dead[0].numel()
    width = max(1, max(int((~d).sum()) for d in dead))
    for (ins, out, places), d in zip(found, dead):
        order = torch.argsort(d.to(torch.int8), stable=True)  # live neurons first, then dead ones as padding
        index = order[:width].sort().values
        for parent, attr, module in places:
            setattr(parent, attr, slice_layer(module, index, "in" if module is out else "out"))
    key = next((k for k in FFN_WIDTH_KEYS if getattr(model.config, k, None) == old), None)
    if key is None and getattr(model.config, "n_inner", "absent") is None:  # GPT-2: None means 4 * n_embd
        key = "n_inner"
    if key is None:
        raise ExportError(f"--compact: no FFN width ({', '.join(FFN_WIDTH_KEYS)}) equal to {old} in {type(model.config).__name__}")
    setattr(model.config, key, width)
    return old, width


POST_LN = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert")  # LayerNorm on the residual stream after each sublayer


@torch.no_grad()
def remove_blocks(model: nn.Module, notes: list[str]) -> tuple[int, int]:
    """Drop the blocks that only add a constant to the residual stream (GPT-2; see the module's docstring), moving
    the constant to the block before; a note for every dead block that stays, saying why.  Returns (before, after)."""
    path, blocks = find_block_list(model)
    idle = [i for i, b in enumerate(blocks) if _all_dead(b)]
    kind = model.config.model_type
    if not idle:
        return len(blocks), len(blocks)
    if kind != "gpt2":
        why = ("a post-LN block still applies its two LayerNorms to the residual stream, so removing it would change the outputs"
               if kind in POST_LN else f"removing blocks is implemented for GPT-2 only, not {type(model).__name__}")
        notes.append(f"blocks {idle}: every attention head and FFN neuron is dead, but they stay: {why}")
        return len(blocks), len(blocks)
    if model.config.scale_attn_by_inverse_layer_idx or model.config.add_cross_attention:
        notes.append(f"blocks {idle}: every head and neuron is dead, but they stay: this GPT-2 scales attention by layer index "
                     "or has cross-attention, which removing a block would change")
        return len(blocks), len(blocks)
    gone = set(idle[1:] if len(idle) == len(blocks) else idle)  # a model keeps one block
    parent, _, attr = path.rpartition(".")
    for i in sorted(gone):
        shift = sum(m.bias for m in _output_layers(blocks[i]))  # the block computes x + shift, exactly
        before = [j for j in range(i) if j not in gone]
        if before:
            _output_layers(blocks[before[-1]])[1].bias += shift  # the block before now ends with + shift
        else:
            model.get_submodule(parent).wpe.weight += shift  # so does the input of the first block
    kept = nn.ModuleList(b for i, b in enumerate(blocks) if i not in gone)
    for i, block in enumerate(kept):  # the cache is indexed by position
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    setattr(model.get_submodule(parent), attr, kept)
    model.config.n_layer = len(kept)
    notes.append(f"blocks {sorted(gone)} removed: every attention head and FFN neuron was dead, so each only added its output "
                 "biases to the residual stream; those now go into the FFN output bias of the block before (the position embeddings for block 0)")
    return len(blocks), len(kept)


def _all_dead(block: nn.Module) -> bool:
    """Every attention head and FFN neuron of the block is dead (constant neurons are folded into zero columns first)."""
    ffn = _ffn_modules(block)
    if ffn is None or compact_heads.attention_layout(block) is None:
        return False
    return bool(_dead_neurons(ffn[0], ffn[1]).all()) and bool(dead_heads(block).all())


def _output_layers(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The attention output projection and the FFN output layer: what a block adds to the residual stream ends there."""
    return block.get_submodule(compact_heads.attention_layout(block)[2]), _ffn_modules(block)[1]


@torch.no_grad()
def compact_attention(model: nn.Module) -> tuple[int, int] | None:
    """Remove dead attention heads block by block; returns (heads before, heads after), None for an unknown layout."""
    path, blocks = find_block_list(model)
    if any(compact_heads.attention_layout(b) is None for b in blocks):
        return None
    before = after = 0
    kept_per_block: dict[str, list[int]] = {}
    for i, block in enumerate(blocks):
        dead = dead_heads(block)
        kept = [h for h in range(head_count(block)) if not dead[h]] or [0]  # a block needs one head to reshape
        before, after = before + dead.numel(), after + len(kept)
        if len(kept) < dead.numel():
            keep_heads(block, kept)
            kept_per_block[str(i)] = kept
    if kept_per_block:
        model.config.spu_compact = {"blocks": path, "heads": kept_per_block}
    return before, after


def _remote_class(model: nn.Module) -> str:
    return f"SpuCompact{type(model).__name__}"


def save_model(model: nn.Module, out_dir: Path, kind: str) -> bool:
    """``save_pretrained``, plus the loading code when heads were removed; True if it was needed."""
    needs_code = bool(getattr(model.config, "spu_compact", None))
    if needs_code:
        model.config.auto_map = {AUTO_CLASSES[kind]: f"spu_compact.{_remote_class(model)}"}
    model.save_pretrained(out_dir)
    if needs_code:
        (Path(out_dir) / "spu_compact.py").write_text(_remote_code(model))
        config_path = Path(out_dir) / "config.json"
        config = json.loads(config_path.read_text())
        config["architectures"] = [_remote_class(model)]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return needs_code


def _remote_code(model: nn.Module) -> str:
    stock = type(model).__name__
    return Path(compact_heads.__file__).read_text() + (
        f"\n\nfrom transformers import {stock} as _Stock  # noqa: E402\n\n\n"
        f"class {_remote_class(model)}(_Stock):\n"
        f'    """{stock} with the attention heads listed in ``config.spu_compact`` removed."""\n\n'
        "    def __init__(self, config, *args, **kwargs):\n"
        "        super().__init__(config, *args, **kwargs)\n"
        "        remove_heads(self, config.spu_compact)\n"
    )


def probe_batch(config, batch_size: int = 8, length: int = 128) -> dict[str, torch.Tensor]:
    """Random token ids: enough to time a forward pass and compare two models' outputs."""
    length = min(length, getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or length)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch_size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def time_forward(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 5) -> float:
    """Median seconds of one forward pass on ``batch`` (after a warm-up pass)."""
    model.eval()
    model(**batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
