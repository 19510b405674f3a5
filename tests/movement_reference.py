"""Sanh, Wolf & Rush (2020)'s movement pruning as their ``emmental`` code does it, rewritten here to hold SPU against.

Written from the paper and the reference's documented behaviour (huggingface/transformers,
examples/research_projects/movement-pruning): every pruned ``Linear`` becomes a layer with a score per weight
(``mask_init="constant"``, ``mask_scale=0``: all scores start at 0), the mask is computed from the scores in every
forward pass and multiplied into the weight (``W * M``; the dense ``W`` stays in the layer), and its gradient
reaches the scores straight through the binarizer.  Hard movement keeps the top ``threshold`` fraction of each
matrix's scores (``TopKBinarizer``); soft movement keeps ``sigmoid(S) > threshold`` with at least 0.5 % of the
matrix (``ThresholdBinarizer``) and adds ``lambda * mean over matrices of mean(sigmoid(S))`` to the loss.  The
threshold follows ``schedule_threshold``: ``initial`` until ``initial_warmup``, a cubic to ``final`` at
``total - final_warmup``, then ``final``; the penalty's weight is ``final_lambda * threshold / final``.  The scores
train in an AdamW group of their own (``mask_scores_learning_rate``, no weight decay) under the same linear
learning-rate decay, and gradient clipping sees weights and scores together.

``Departures`` names where SPU departs on purpose (README, "Movement pruning"); the faithful reference is
``Departures()``, SPU's behaviour ``Departures.spu()``.  Harness choices, not behaviour: the threshold is set on
the layers instead of passed through ``forward``, warm-ups are given in steps (the reference counts them in
units of its LR warm-up), and ties among equal scores go to the larger weight (the reference leaves their order
to ``sort``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

TIE_BREAK = 1e-6  # spu_engine.methods.pruning.movement.TIE_BREAK: a deterministic order for equal scores
NO_DECAY = ("bias", "LayerNorm.weight")  # the reference's no_decay list
TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")  # MaskedBert's


@dataclass
class Departures:
    """Where SPU's pruner departs from the reference on purpose (False: the reference's way)."""

    round_count: bool = False  # prune round(sparsity * n) per matrix; the reference keeps int(threshold * n)
    hold_pruned: bool = False  # a pruned weight and its Adam moments stay put; the reference's momentum moves them
    clip_model_only: bool = False  # clip by the norm of dL/dW' (pruned entries too), scores unclipped; the
    # reference clips by the norm of all its gradients (dL/dW = 0 where pruned, the scores' included)

    @classmethod
    def spu(cls) -> Departures:
        return cls(round_count=True, hold_pruned=True, clip_model_only=True)


@dataclass
class Settings:
    steps: int
    lr: float
    score_lr: float
    initial_threshold: float  # topK: kept fraction; soft: threshold on sigmoid(score)
    final_threshold: float
    initial_warmup: int  # steps
    final_warmup: int  # steps
    soft: bool = False
    final_lambda: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping
    departures: Departures = field(default_factory=Departures)


def schedule_threshold(step: int, s: Settings) -> tuple[float, float]:
    """The threshold at ``step`` and the penalty's weight (``masked_run_glue.schedule_threshold``)."""
    if step <= s.initial_warmup:
        threshold = s.initial_threshold
    elif step > s.steps - s.final_warmup:
        threshold = s.final_threshold
    else:
        left = 1 - (step - s.initial_warmup) / (s.steps - s.final_warmup - s.initial_warmup)
        threshold = s.final_threshold + (s.initial_threshold - s.final_threshold) * left**3
    return threshold, s.final_lambda * threshold / s.final_threshold


class StraightThrough(torch.autograd.Function):
    """The mask in the forward pass; its gradient passes to the scores unchanged."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class MaskedLinear(nn.Linear):
    """A ``Linear`` whose weight is multiplied by a mask of its scores in every forward pass."""

    def __init__(self, linear: nn.Linear, settings: Settings) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.load_state_dict(linear.state_dict())
        self.settings = settings
        self.mask_scores = nn.Parameter(torch.zeros_like(self.weight))  # mask_init constant, mask_scale 0
        self.threshold = settings.initial_threshold
        self.tie_scale = 0.0  # TIE_BREAK / the largest |W| of all masked layers, set by the loop
        self.mask = torch.ones_like(self.weight, dtype=torch.bool)  # the mask of the last forward pass
        self.masked_grad: torch.Tensor | None = None  # dL/dW' of the last backward pass

    @torch.no_grad()
    def binarize(self) -> torch.Tensor:
        scores, n = self.mask_scores + self.weight.abs() * self.tie_scale, self.weight.numel()
        if self.settings.soft:  # ThresholdBinarizer(sigmoid=True), at least 0.5 % kept
            keep = torch.sigmoid(scores) > self.threshold
            least = int(0.005 * n) + 1
            if keep.sum() < least:
                keep = scores > scores.flatten().kthvalue(max(n - least, 1)).values
            return keep
        kept = n - round((1 - self.threshold) * n) if self.settings.departures.round_count else int(self.threshold * n)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[scores.flatten().sort(descending=True, stable=True).indices[:kept]] = True
        return keep.view_as(scores)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mask = self.binarize()
        mask = StraightThrough.apply(self.mask_scores, self.mask.to(self.weight.dtype))
        masked = mask * self.weight
        if masked.requires_grad:
            masked.register_hook(self._keep_grad)
        return F.linear(x, masked, self.bias)

    def _keep_grad(self, grad: torch.Tensor) -> None:
        self.masked_grad = grad


def masked_copy(model: nn.Module, settings: Settings) -> tuple[nn.Module, dict[str, MaskedLinear]]:
    """A copy of ``model`` with the reference's layers in place of every targeted ``Linear`` (name -> layer)."""
    model = copy.deepcopy(model)
    layers = {}
    for name, module in list(model.named_modules()):
        for child, sub in list(module.named_children()):
            full = f"{name}.{child}" if name else child
            if isinstance(sub, nn.Linear) and ".layer." in full and full.endswith(TARGETS):
                layers[f"{full}.weight"] = masked = MaskedLinear(sub, settings)
                setattr(module, child, masked)
    return model, layers


def regularization(layers: dict[str, MaskedLinear]) -> torch.Tensor:
    """``regularization(model, "l1")``: the mean over matrices of each one's mean sigmoid(score)."""
    return sum(torch.sigmoid(m.mask_scores).sum() / m.mask_scores.numel() for m in layers.values()) / len(layers)


@dataclass
class Step:
    loss: float  # the task's (the penalty left out, as SPU reports it)
    scores: dict[str, torch.Tensor]  # after the step's update
    masks: dict[str, torch.Tensor]  # the masks its forward pass used


def train(model: nn.Module, batches: list[dict[str, torch.Tensor]], settings: Settings) -> tuple[list[Step], nn.Module]:
    """The reference's training loop (``masked_run_glue.train``), no LR warm-up, one step per batch: each step's
    record, and the trained copy of ``model`` (its masked layers keep the last threshold)."""
    model, layers = masked_copy(model, settings)
    model.train()
    named = list(model.named_parameters())
    weights = [(n, p) for n, p in named if "mask_scores" not in n]
    scores = [p for n, p in named if "mask_scores" in n]
    opt = torch.optim.AdamW(
        [
            {"params": scores, "lr": settings.score_lr, "weight_decay": 0.0},
            {
                "params": [p for n, p in weights if not any(k in n for k in NO_DECAY)],
                "weight_decay": settings.weight_decay,
            },
            {"params": [p for n, p in weights if any(k in n for k in NO_DECAY)], "weight_decay": 0.0},
        ],
        lr=settings.lr,
    )
    base = [g["lr"] for g in opt.param_groups]
    out = []
    for step, batch in enumerate(batches):
        threshold, lam = schedule_threshold(step, settings)
        scale = TIE_BREAK / max(float(m.weight.detach().abs().max()) for m in layers.values())
        for m in layers.values():
            m.threshold, m.tie_scale = threshold, scale
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * (settings.steps - step) / settings.steps
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        task_loss = F.cross_entropy(model(**inputs).logits.float(), batch["labels"])
        loss = task_loss + lam * regularization(layers) if settings.soft and lam else task_loss
        loss.backward()
        if settings.max_grad_norm:
            clip(model, layers, settings)
        held = _pruned_state(opt, layers) if settings.departures.hold_pruned else []
        opt.step()
        with torch.no_grad():
            for t, where, before in held:
                t.copy_(torch.where(where, before, t))
        opt.zero_grad(set_to_none=True)
        out.append(
            Step(
                task_loss.item(),
                {n: m.mask_scores.detach().clone() for n, m in layers.items()},
                {n: m.mask.clone() for n, m in layers.items()},
            )
        )
    return out, model


def clip(model: nn.Module, layers: dict[str, MaskedLinear], s: Settings) -> None:
    if not s.departures.clip_model_only:
        nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        return
    weights = [p for n, p in model.named_parameters() if "mask_scores" not in n and p.grad is not None]
    grads = {id(m.weight): m.masked_grad for m in layers.values()}
    total = torch.linalg.vector_norm(torch.stack([grads.get(id(p), p.grad).norm() for p in weights]))
    torch.nn.utils.clip_grads_with_norm_(weights, s.max_grad_norm, total)


def _pruned_state(opt: torch.optim.Optimizer, layers: dict[str, MaskedLinear]) -> list:
    """SPU's way: each pruned weight's value and Adam moments, to put back after the step."""
    held = []
    for m in layers.values():
        where = ~m.mask
        for t in (m.weight, *(v for v in opt.state.get(m.weight, {}).values() if v.shape == m.weight.shape)):
            held.append((t.data, where, t.detach().clone()))
    return held
