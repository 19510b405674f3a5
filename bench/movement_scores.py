"""What movement pruning's scores know after a dense warm-up, measured by pruning once and evaluating.

    python bench/movement_scores.py [--warmup 216] [--lr 1e-4] [--device cuda] [--out bench/results/movement_scores.md]

Trains MiniLM on SST-2 (batch 32, length 64, lr 1e-4, word embeddings frozen, as bench/fidelity.py) for
``--warmup`` steps (default one epoch, the reference's ``initial_warmup``) with movement scores learning and
nothing pruned; then, for sparsities 10 / 30 / 50 / 90 %, masks the weights by each ranking (magnitude per
tensor, movement per tensor, movement over all targets, random per tensor), scores all 872 dev sentences without
retraining, and puts the weights back.  For each, the share of the kept weights that magnitude keeps too: a
ranking that knows nothing of magnitude overlaps it by 1 - sparsity, as random does.

Why it exists: movement rows of bench/fidelity.py collapse to the majority class at this budget; this is the
experiment that says whether the scores or the schedule are to blame (issue 14).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from common import DATA, minilm_sst2

from spu_engine.core.model_source import offline_model_dir
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig

SPARSITIES = (0.1, 0.3, 0.5, 0.9)


def keep_top(values: dict[str, torch.Tensor], sparsity: float, per_tensor: bool) -> dict[str, torch.Tensor]:
    """Bool masks keeping the largest ``1 - sparsity`` of ``values``, per tensor or over all of them."""
    if not per_tensor:
        flat = torch.cat([v.flatten() for v in values.values()])
        threshold = flat.topk(round(flat.numel() * (1 - sparsity))).values.min()
        return {n: v >= threshold for n, v in values.items()}
    out = {}
    for n, v in values.items():
        keep = torch.zeros(v.numel(), dtype=torch.bool, device=v.device)
        keep[v.flatten().topk(round(v.numel() * (1 - sparsity))).indices] = True
        out[n] = keep.view_as(v)
    return out


@torch.no_grad()
def layer_inputs(engine, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each target matrix's input on 64 dev sentences in the dense model (its own input, whatever the pruning before it)."""
    pm = next(m for m in engine.methods if m.section == "pruning")
    owner = {id(pm.masks.param(n)): n for n in scores}
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _mod, args, name=owner[id(module.weight)]: seen.__setitem__(name, args[0].detach())
        )
        for module in engine.model.modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor) and id(module.weight) in owner
    ]
    batch = engine.task.collate(engine.task.eval[:64])
    engine.model.eval()
    engine.model(**{k: v.to(engine.device) for k, v in batch.items() if k != "labels"})
    for h in hooks:
        h.remove()
    return seen


@torch.no_grad()
def own_shift(inputs: dict[str, torch.Tensor], dense: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]) -> float:
    """Mean over matrices of |(W * removed) x| / |W x|: how far a removal moves each layer's output on its own input."""
    ratios = [float((inputs[n] @ (dense[n] * ~keep[n]).T).norm() / (inputs[n] @ dense[n].T).norm()) for n in inputs]
    return sum(ratios) / len(ratios)


def gradient_norm(engine, scores: dict[str, torch.Tensor]) -> float:
    """The norm of the loss gradient over the target matrices on one training batch, the model as it is now."""
    pm = next(m for m in engine.methods if m.section == "pruning")
    engine.model.train()
    engine.model.zero_grad(set_to_none=True)
    batch = engine.task.collate(engine.task.train[:32])
    engine.task.per_sample_loss(engine.model, {k: v.to(engine.device) for k, v in batch.items()}).mean().backward()
    norm = float(torch.stack([pm.masks.param(n).grad.norm() for n in scores]).norm())
    engine.model.zero_grad(set_to_none=True)
    return norm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--warmup", type=int, default=216, help="dense steps with the scores learning (216: one epoch of SST-2)"
    )
    ap.add_argument("--lr", type=float, default=1e-4, help="the model's peak learning rate (scores: 1e-2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "movement_scores.md")
    args = ap.parse_args()
    _, tokenizer, task, base = minilm_sst2(64)
    policy = {
        "freeze": [{"units": ["embeddings"], "trainable": False}],
        "pruning": {
            "method": "movement",
            "scope": "per_layer",
            "schedule": {"start_step": 10**6, "end_step": 10**6, "final_sparsity": 0.9},  # nothing pruned in this run
            "movement": {"score_lr": 1e-2, "warmup": 0.0, "final_hold": 0.0},
        },
    }
    config = EngineConfig(
        model=str(offline_model_dir()),
        data=str(DATA),
        steps=args.warmup,
        batch_size=32,
        max_length=64,
        lr=args.lr,
        warmup=0.1,
        eval_every=10**6,
        stats_every=10**6,
        device=args.device,
    )
    engine = Engine(config, parse_policy(policy), None, model=copy.deepcopy(base), tokenizer=tokenizer, task=task)
    pm = next(m for m in engine.methods if m.section == "pruning")
    start = {n: pm.masks.dense(n).clone() for n in pm.pruner.score_params}
    t0 = time.perf_counter()
    engine.run()
    scores = {n: s.detach().clone() for n, s in pm.pruner.score_params.items()}
    dense = {n: pm.masks.dense(n).clone() for n in scores}
    flat = torch.cat([s.flatten() for s in scores.values()])
    moved = torch.cat([(dense[n] - start[n]).abs().flatten() for n in scores])
    size = torch.cat([start[n].abs().flatten() for n in scores])
    travel = (
        f"Weights moved a median {moved.median():.4f} (their median size {size.median():.4f}); "
        f"{100 * (moved > size).float().mean():.1f} % moved further than their own size."
    )
    generator = torch.Generator().manual_seed(0)
    rankings = {
        "magnitude, per tensor": ({n: d.abs() for n, d in dense.items()}, True),
        "movement, per tensor": (scores, True),
        "movement, all targets": (scores, False),
        "random, per tensor": (
            {n: torch.rand(d.shape, generator=generator).to(d.device) for n, d in dense.items()},
            True,
        ),
    }
    lines = [
        f"# Movement scores after {args.warmup} dense steps at lr {args.lr:g} (MiniLM / SST-2), pruned once, no retraining",
        "",
        f"Written by `bench/movement_scores.py` ({time.perf_counter() - t0:.0f} s of training).  Scores: mean |s| {flat.abs().mean():.4f}, "
        f"{100 * (flat > 0).float().mean():.1f} % positive, range {flat.min():.3f} to {flat.max():.3f}.  "
        f"Dense dev accuracy: **{engine.evaluate()['accuracy']:.4f}**.  {travel}",
        "",
        "| sparsity | " + " | ".join(rankings) + " |",
        "|---|" + "---|" * len(rankings),
    ]
    inputs = layer_inputs(engine, scores)
    dense_grad = gradient_norm(engine, scores)
    shifts: dict[str, list[str]] = {}
    for sparsity in SPARSITIES:
        cells = []
        largest = keep_top(rankings["magnitude, per tensor"][0], sparsity, True)
        for label, (values, per_tensor) in rankings.items():
            keep = keep_top(values, sparsity, per_tensor)
            with torch.no_grad():
                for n in scores:
                    pm.masks.param(n).copy_(dense[n] * keep[n])
            accuracy = engine.evaluate()["accuracy"]
            overlap = sum(int((keep[n] & largest[n]).sum()) for n in scores) / sum(int(keep[n].sum()) for n in scores)
            cells.append(f"{accuracy:.4f} (overlap {overlap:.2f})")
            shifts.setdefault(label, []).append(
                f"{own_shift(inputs, dense, keep):.3f} / {gradient_norm(engine, scores) / dense_grad:.2g}"
            )
        with torch.no_grad():
            for n in scores:
                pm.masks.param(n).copy_(dense[n])
        lines.append(f"| {100 * sparsity:.0f} % | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines += [
        "",
        "What each removal does, layer by layer, on 64 dev sentences: the change of every pruned matrix's output for its own dense "
        "input, |W_removed x| / |W x| (averaged over the matrices), then the gradient norm of the pruned model on a training "
        "batch against the dense model's (a network whose gradient vanishes has stopped learning: its scores no longer move).",
        "",
        "| ranking | " + " | ".join(f"{100 * s:.0f} %: shift / gradient" for s in SPARSITIES) + " |",
        "|---|" + "---|" * len(SPARSITIES),
        *(f"| {label} | " + " | ".join(cells) + " |" for label, cells in shifts.items()),
    ]
    engine.close()
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
