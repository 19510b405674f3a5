"""A LoRA / AdaLoRA / (IA)3 run as peft shares it: ``adapter_config.json`` + ``adapter_model.safetensors``.

The folder is written by peft itself (``get_peft_model`` on the pristine base model, the run's tensors copied in,
``save_pretrained``), so its key names and config fields are the ones ``PeftModel.from_pretrained(base, folder)``
reads.  What the run changed outside the tuners is found by comparing every base tensor with the base model: whole
modules (the trained classifier head, LayerNorms, pruned layers) go into ``modules_to_save``; a LoRA target whose
base weight moved by a low-rank part (PiSSA and OLoRA leave the residual there) gets that part as extra rank, so it
loads onto the unchanged base; any other change to a target's base weight cannot be said in the folder: --merge.
The folder is loaded back onto a fresh base and its outputs compared with the run's model.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from spu_engine.model.loading import load_model, stable_name
from spu_engine.tools.export.errors import ExportError
from spu_engine.tools.export.probe import probe_batch

PEFT_TASKS = {"classification": "SEQ_CLS", "qa": "QUESTION_ANS", "lm": "CAUSAL_LM", "sft": "CAUSAL_LM"}
PREFIX = "base_model.model."


def base_model(name: str, kind: str, like: nn.Module) -> nn.Module:
    """The pristine base model the folder applies to, with the run's head shape and pooling."""
    labels = getattr(like.config, "num_labels", None) if kind == "classification" else None
    with torch.random.fork_rng(devices=[]):
        return load_model(name, kind, num_labels=labels, pooling=getattr(like.config, "spu_pooling", None)).eval()


@torch.no_grad()
def write_peft_folder(run_model: nn.Module, name: str, reference: str, kind: str, out_dir: Path) -> float:
    """Write ``run_model``'s tuner (see the module's docstring); returns the largest output difference between the
    folder loaded with ``PeftModel.from_pretrained`` on the base and the run's model, on a probe batch."""
    base = base_model(name, kind, run_model)
    config = copy.deepcopy(run_model.peft_config["default"])
    pristine = {n: p.detach().clone() for n, p in base.named_parameters()}
    extra = _moved_targets(run_model, pristine, config)
    config.modules_to_save = _changed_modules(run_model, pristine) or None
    config.task_type = PEFT_TASKS[kind]
    config.base_model_name_or_path = reference
    config.inference_mode = False
    if config.peft_type.value == "LORA":
        config.init_lora_weights = True  # the factors are the trained ones: no PiSSA run again on loading
        config.rank_pattern = {**{m: 2 * r for m, (r, _, _) in extra.items()}, **(config.rank_pattern or {})}
        config.alpha_pattern = {**{m: a for m, (_, a, _) in extra.items()}, **(config.alpha_pattern or {})}
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # peft's notes on fan_in_fan_out and modules_to_save: nothing to act on
        folder = get_peft_model(base, config)
    run_state = run_model.state_dict()
    wanted, missing = {}, []
    for key in folder.state_dict():
        inner = key.removeprefix(PREFIX)
        saved = ".modules_to_save.default." in inner
        source = inner.replace(".modules_to_save.default.", ".")
        if ".original_module." in inner or (not saved and stable_name(source) in pristine):
            continue  # the base model's own tensors
        module, _, leaf = source.rpartition(".lora_")
        if module in extra and leaf in ("A.default.weight", "B.default.weight"):
            wanted[key] = extra[module][2][leaf[0]]
        elif source in run_state:
            wanted[key] = run_state[source]
        else:
            missing.append(source)
    if missing:
        raise ExportError(f"the run's model has no value for {missing[:3]} of the adapter folder")
    folder.load_state_dict(wanted, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an AdaLoRA matrix cut to rank 0 is read as an unsharded ZeRO-3 tensor
        folder.save_pretrained(out_dir)
    return _check(run_model, name, kind, out_dir)


def _changed_modules(run_model: nn.Module, pristine: dict[str, torch.Tensor]) -> list[str]:
    """Modules outside the tuners whose tensors differ from the base model's: they are saved whole."""
    modules = []
    for live, p in run_model.named_parameters():
        name = stable_name(live)
        if ".base_layer." in live or name not in pristine or torch.equal(p, pristine[name]):
            continue
        module = name.rpartition(".")[0]
        if module not in modules:
            modules.append(module)
    return modules


def _moved_targets(run_model: nn.Module, pristine: dict[str, torch.Tensor], config) -> dict:
    """LoRA targets whose base weight is not the base model's: module -> (its rank, the alpha that keeps its scaling
    at twice the rank, {"A": [A; A0], "B": [B, B0]}) with B0 A0 the base weight's change over the scaling."""
    extra = {}
    for live, p in run_model.named_parameters():
        if ".base_layer." not in live or torch.equal(p, pristine[stable_name(live)]):
            continue
        module = live.split(".base_layer.")[0]
        layer = run_model.get_submodule(module)
        if config.peft_type.value != "LORA" or not live.endswith(".weight"):
            raise ExportError(
                f"{stable_name(live)} differs from the base model's (pruned, or trained beside the "
                f"{config.peft_type.value} layers): an adapter folder cannot carry that; export with --merge"
            )
        scale, rank = layer.scaling["default"], layer.r["default"]
        delta = (p - pristine[stable_name(live)]).double() / scale
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.t()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        b0, a0 = u[:, :rank] * s[:rank].sqrt(), s[:rank].sqrt()[:, None] * vh[:rank]
        if (delta - b0 @ a0).abs().max() > 1e-5 * max(1.0, float(delta.abs().max())):
            raise ExportError(
                f"{stable_name(live)} differs from the base model's by more than a rank-{rank} change (pruned, or "
                "trained beside LoRA): an adapter folder cannot carry that; export with --merge"
            )
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        alpha = scale * (math.sqrt(2 * rank) if config.use_rslora else 2 * rank)
        extra[module] = (
            rank,
            alpha,
            {"A": torch.cat([a, a0.to(a.dtype)]), "B": torch.cat([b, b0.to(b.dtype)], dim=1)},
        )
    return extra


@torch.no_grad()
def _check(run_model: nn.Module, name: str, kind: str, out_dir: Path) -> float:
    """Load the folder as a user would, onto a fresh base, and compare its outputs with the run's model."""
    loaded = PeftModel.from_pretrained(base_model(name, kind, run_model), out_dir).eval()
    batch = probe_batch(run_model.config, batch_size=4, length=32)
    return float((loaded(**batch)[0] - run_model.eval()(**batch)[0]).abs().max())
