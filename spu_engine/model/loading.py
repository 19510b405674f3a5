"""Load a model and tokenizer, and split any HF architecture into units.

A *unit* is what the console shows as one row: ``embeddings``, ``block0`` ..
``block{L-1}`` (the children of the model's block ModuleList), and ``head``
(everything registered after the blocks: pooler, final norm, classifier).
Parameters registered before the blocks belong to ``embeddings``, after them
to ``head``.  Every parameter belongs to exactly one unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from spu_engine.core.model_source import ModelLoadError, check_source, resolve_model_name
from spu_engine.model.pooling import PoolingError, use_pooling


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    name = resolve_model_name(name)
    check_source(name)
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise ModelLoadError(f"cannot load tokenizer from {name!r}: {_first_line(exc)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


# the transformers Auto class that loads a model with each task's head (also named in exported folders' auto_map)
AUTO_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "qa": "AutoModelForQuestionAnswering",
    "lm": "AutoModelForCausalLM",
}


def load_model(
    name: str,
    task: str = "classification",
    num_labels: int | None = 2,
    tokenizer=None,
    labels: list[str] | None = None,
    trained: bool = False,
    pooling: str | None = None,
) -> nn.Module:
    """Load pretrained weights with the head ``task`` needs (classification, qa, lm).

    ``num_labels`` None keeps the folder's; ``trained``: every weight must come from the folder (a teacher), so a
    head the folder lacks is an error rather than a new random one; ``labels``: the data's classes, named when the
    folder's head has another number of them; ``pooling`` (classification: cls | mean, ``pooling.py``) None: the
    one the folder's config.json records (``spu_pooling``, an SPU export), else cls."""
    import transformers
    from transformers import AutoConfig

    name = resolve_model_name(name)
    check_source(name)
    auto = getattr(transformers, AUTO_CLASSES[task])
    kwargs = {"num_labels": num_labels} if task == "classification" and num_labels is not None else {}
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
        if tokenizer is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            model, info = auto.from_pretrained(name, config=config, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
    except Exception as exc:
        if "ignore_mismatched_sizes" in str(exc) and num_labels is not None:
            raise ModelLoadError(head_mismatch(name, num_labels, labels)) from None
        raise ModelLoadError(f"cannot load a {task} model from {name!r}: {_first_line(exc)}") from None
    if trained and info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ModelLoadError(
            f"{name!r} has no trained {task} head ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
            "would start random): fine-tune it on the task first"
        )
    if task == "classification":
        pooled(model, pooling or getattr(model.config, "spu_pooling", None))
    return model


def pooled(model: nn.Module, pooling: str | None) -> nn.Module:
    """``model`` with ``pooling`` applied (None: as it is); a model that mean pooling does not fit: ModelLoadError."""
    if pooling is None:
        return model
    try:
        return use_pooling(model, pooling)
    except PoolingError as exc:
        raise ModelLoadError(str(exc)) from None


def head_mismatch(name: str, num_labels: int, labels: list[str] | None) -> str:
    """The folder's classification head has another number of classes than the data (transformers refuses the
    weights without saying which, its report silenced here)."""
    from transformers import AutoConfig

    own = class_names(AutoConfig.from_pretrained(name))
    data = f"{num_labels}: {labels}" if labels else str(num_labels)
    return (
        f"{name!r} has a classification head of {len(own)} labels {own}, and the data has {data}; train on data with "
        f"those {len(own)} labels, or start from a model without a task head (its base model) to get a new one"
    )


def name_classes(model: nn.Module, names: list[str] | None) -> None:
    """Name a classifier's classes in its config (``id2label``), so a saved or exported model says which label each id is."""
    config = getattr(model, "config", None)
    if names and config is not None and getattr(config, "num_labels", None) == len(names):
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}


def class_names(config) -> list[str]:
    """The label of each class id a model's config names; numbered ``0`` .. ``n-1`` when it has only HF's ``LABEL_i`` defaults."""
    names = [str(config.id2label[i]) for i in range(config.num_labels)]
    return [str(i) for i in range(len(names))] if names == [f"LABEL_{i}" for i in range(len(names))] else names


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# --------------------------------------------------------------------------- stable names

# segments peft inserts when it wraps a module: ``query.weight`` -> ``query.base_layer.weight``, and the adapter name of
# the tensors it adds: ``query.lora_A.default.weight``
_WRAPPER_SEGMENTS = ("base_layer", "default")


def stable_name(name: str) -> str:
    """A parameter's name in the model as loaded, whatever PEFT wrapped since (``query.base_layer.weight`` -> ``query.weight``).

    Rules, masks, events, checkpoints and the console all speak these names, so a rule written before a PEFT switch
    means the same tensor after it.  Tensors PEFT adds keep their own stable names (``query.lora_A.weight``).
    """
    if "base_layer" not in name and "default" not in name:
        return name
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def stable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters by stable name, in model order."""
    return {stable_name(n): p for n, p in model.named_parameters()}


def count_params(module: nn.Module, trainable: bool = False) -> int:
    """Parameter entries of ``module``; with ``trainable``, only those that train now."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


# --------------------------------------------------------------------------- units


@dataclass
class Unit:
    name: str
    params: list[str] = field(default_factory=list)
    numel: int = 0


@dataclass
class Units:
    """The partition of a model's parameters into units, in model order."""

    units: list[Unit]
    unit_of: dict[str, str]
    block_prefix: str
    num_blocks: int

    def __iter__(self):
        return iter(self.units)

    def __getitem__(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def unit_for(self, name: str) -> str:
        """The unit of ``name``, also for a tensor a method has not added yet (inside a block: that block)."""
        unit = self.unit_of.get(name)
        if unit is not None:
            return unit
        head, _, rest = name.partition(self.block_prefix + ".")
        index = rest.split(".", 1)[0]
        if not head and index.isdigit():
            return f"block{index}"
        return "head"

    def describe(self) -> list[dict]:
        return [{"name": u.name, "params": u.params, "numel": u.numel} for u in self.units]


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: the one holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) != 1:
                continue
            n = count_params(module)
            if best is None or n > best[0]:
                best = (n, name, module)
    if best is None:
        raise ModelLoadError(f"{type(model).__name__}: found no ModuleList of transformer blocks")
    return best[1], best[2]


def find_units(model: nn.Module) -> Units:
    prefix, blocks = find_block_list(model)
    shapes = stable_parameters(model)
    names = list(shapes)
    block_units = [Unit(f"block{i}") for i in range(len(blocks))]
    emb, head = Unit("embeddings"), Unit("head")
    seen_block = False
    unit_of: dict[str, str] = {}
    dotted = prefix + "."
    for n in names:
        if n.startswith(dotted):
            idx = int(n[len(dotted) :].split(".", 1)[0])
            unit = block_units[idx]
            seen_block = True
        elif not seen_block:
            unit = emb
        else:
            unit = head
        unit.params.append(n)
        unit.numel += shapes[n].numel()
        unit_of[n] = unit.name
    units = [u for u in [emb, *block_units, head] if u.params]
    return Units(units=units, unit_of=unit_of, block_prefix=prefix, num_blocks=len(blocks))


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
