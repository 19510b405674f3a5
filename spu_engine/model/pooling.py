"""Mean pooling for a sequence classifier: its head sees the mean of the last hidden states over the real tokens.

Sentence-transformers checkpoints (all-MiniLM-L6-v2 and its family) were trained to mean-pool their tokens; their
[CLS] vector and BERT's pooler never trained.  ``mean_pool(model)`` puts one forward hook on the model's base
encoder (``model.base_model``) that rewrites what the stock head reads, so no class changes, no tensor is added or
renamed, and every path that runs the model (training, PEFT, pruning, checkpoints, FSDP2, export) keeps working:

- a base model with a pooler (BERT, ALBERT): its ``pooler_output`` becomes the masked mean, fed straight to the
  head's dropout and classifier, as the sentence-transformers / SetFit recipe feeds the mean embedding to a linear
  head; BERT's pooler (dense + tanh, untrained in these checkpoints) is bypassed, its weights kept unused;
- any other encoder (RoBERTa, DistilBERT, DeBERTa, ELECTRA): position 0 of ``last_hidden_state``, where their heads
  read [CLS], becomes the masked mean, so their own head (dense + tanh, or pre-classifier) sees it.

Self-contained on purpose (torch only, no ``from __future__``): ``spu export`` ships this file in the folder as its
loading code.  ``config.spu_pooling = "mean"`` records the pooling, so a saved folder says it.
"""

import torch
from torch import nn

POOLINGS = ("cls", "mean")


class PoolingError(ValueError):
    """Mean pooling does not fit this model; one line says why."""


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``hidden`` (batch, tokens, width) over the tokens ``mask`` keeps (all of them when None).

    ``mask`` is the tokenizer's (batch, tokens) 1/0, or the 4-D (batch, 1, queries, tokens) one an encoder's attention
    reads (boolean, or additive: 0 where attended), whose first query's row is the padding mask."""
    if mask is None:
        return hidden.mean(dim=1)
    if mask.dim() == 4:
        mask = mask[:, 0, 0, :]
        mask = mask == 0 if mask.is_floating_point() else mask
    weights = mask[:, : hidden.shape[1]].to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _mean_pooled(module: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook of the base encoder: what the head reads becomes the masked token mean."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    hidden = output[0]
    mean = masked_mean(hidden, mask)
    if getattr(module, "pooler", None) is not None:
        if isinstance(output, tuple):
            return (output[0], mean, *output[2:])
        output["pooler_output"] = mean
        return output
    first = torch.cat([mean.unsqueeze(1), hidden[:, 1:]], dim=1)
    if isinstance(output, tuple):
        return (first, *output[1:])
    output["last_hidden_state"] = first
    return output


def _encoder(model: nn.Module) -> nn.Module:
    """The base encoder whose output the classification head reads; a decoder classifier (it reads the last token)
    is refused."""
    if not hasattr(model, "classifier"):
        raise PoolingError(
            f"pooling: mean is for encoder classifiers that read [CLS] (BERT, RoBERTa, DistilBERT, ...); "
            f"{type(model).__name__} classifies from its last token: use pooling: cls"
        )
    encoder = getattr(model, "base_model", model)
    if encoder is model:
        raise PoolingError(f"pooling: mean: {type(model).__name__} has no base encoder to pool")
    return encoder


def pooling_of(model: nn.Module) -> str:
    """``mean`` when ``mean_pool`` was applied to ``model`` (or a copy of it), else ``cls``."""
    encoder = getattr(model, "base_model", model)
    return "mean" if _mean_pooled in encoder._forward_hooks.values() else "cls"


def mean_pool(model: nn.Module) -> nn.Module:
    """Make ``model``'s head see the masked token mean (once: applying it again changes nothing); returns it."""
    if pooling_of(model) != "mean":
        _encoder(model).register_forward_hook(_mean_pooled, with_kwargs=True)
    model.config.spu_pooling = "mean"
    return model


def use_pooling(model: nn.Module, pooling: str) -> nn.Module:
    """``model`` pooling as ``pooling`` (one of POOLINGS) says: ``mean_pool``, or the stock [CLS] head."""
    if pooling not in POOLINGS:
        raise PoolingError(f"pooling: {pooling!r} is not a pooling; choose one of {' | '.join(POOLINGS)}")
    if pooling == "mean":
        return mean_pool(model)
    encoder = getattr(model, "base_model", model)
    for key, hook in list(encoder._forward_hooks.items()):
        if hook is _mean_pooled:
            del encoder._forward_hooks[key]
            encoder._forward_hooks_with_kwargs.pop(key, None)
    config = getattr(model, "config", None)
    if hasattr(config, "spu_pooling"):
        del config.spu_pooling
    return model
