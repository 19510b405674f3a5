"""Selective-update methods on SST-2 with the same step budget: dev accuracy, trainable share, wall time.

MiniLM (all-MiniLM-L6-v2) trains on ../shared/data/sst2/train.tsv for the same
number of optimizer steps per method and is evaluated on dev.tsv.  Each method
gets the learning rate its paper uses for short runs (the added tensors and the
task head of the PEFT methods train at it).  Wall time is the whole
``Engine.run()``: training plus one final dev evaluation (weight-update
skipping also evaluates every ``--wus-eval-every`` steps: its phases need it).
"Trainable" is the mean over steps of the trainable share of all parameters
(added ones included).  Writes the table to bench/results/methods_sst2.md.

    python bench/methods_sst2.py [--steps 60] [--batch-size 32] [--max-length 64] [--only bitfit lora]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import DATA, minilm_sst2

from spu_engine.core.model_source import offline_model_dir
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.model.loading import count_params

RESULTS = Path(__file__).resolve().parent / "results" / "methods_sst2.md"

# key, label, policy, learning rate
METHODS = [
    ("full", "full fine-tuning", {}, 1e-4),
    (
        "top2",
        "top-2 blocks (+ head)",
        {
            "freeze": [
                {"match": "*", "trainable": False},
                {"layers": [-2, -1], "trainable": True},
                {"units": ["head"], "trainable": True},
            ]
        },
        1e-4,
    ),
    ("bitfit", "BitFit", {"peft": {"method": "bitfit"}}, 1e-3),
    ("adapter", "Houlsby adapters (64)", {"peft": {"method": "adapter", "size": 64}}, 1e-3),
    ("ia3", "(IA)^3", {"peft": {"method": "ia3"}}, 3e-3),
    ("lora", "LoRA (r=8, alpha 16)", {"peft": {"method": "lora", "r": 8, "alpha": 16}}, 5e-4),
    ("sb", "selective backprop (keep 0.5)", {"selective_backprop": {"mode": "percentile", "keep": 0.5}}, 1e-4),
    (
        "wus",
        "weight-update skipping",
        {"weight_update_skipping": {"enabled": True, "start_phase": "full", "patience": 1}},
        1e-4,
    ),
]


def run(key: str, label: str, policy: dict, lr: float, base_model, task, tokenizer, args) -> dict:
    config = EngineConfig(
        model=str(offline_model_dir()),
        data=str(DATA),
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lr=lr,
        warmup=0.1,
        eval_every=args.wus_eval_every if key == "wus" else 0,
        stats_every=10**6,
    )
    engine = Engine(config, parse_policy(policy), None, model=copy.deepcopy(base_model), tokenizer=tokenizer, task=task)
    total = count_params(engine.model)
    events: list[dict] = []
    engine.sinks.append(lambda _line, ev: events.append(ev) if ev["type"] in ("step", "eval", "policy") else None)
    t0 = time.perf_counter()
    engine.run()
    wall = time.perf_counter() - t0
    engine.close()
    steps = [e for e in events if e["type"] == "step"]
    final = [e for e in events if e["type"] == "eval"][-1]
    switches = [
        f"{e['step']}:{e['change']['set']['weight_update_skipping']['phase']}"
        for e in events
        if e["type"] == "policy" and e.get("source") == "weight_update_skipping"
    ]
    row = {
        "label": label,
        "lr": lr,
        "accuracy": final["accuracy"],
        "trainable": statistics.mean(e["trainable"] for e in steps) / total,
        "wall": wall,
        "samples": steps[-1]["samples"],
        "note": ("phase switches " + ", ".join(switches))
        if key == "wus" and switches
        else ("no phase switch" if key == "wus" else ""),
    }
    print(
        f"{label:<32} acc {row['accuracy']:.4f}  trainable {100 * row['trainable']:7.3f} "
        f"%  wall {wall:6.1f} s  samples {row['samples']}  {row['note']}",
        flush=True,
    )
    return row


def table(rows: list[dict], args) -> str:
    lines = [
        f"MiniLM on SST-2: {args.steps} steps of batch {args.batch_size}, max length {args.max_length}, "
        f"{torch.get_num_threads()} CPU threads (shared machine: wall times are noisy); dev = all of dev.tsv",
        "",
        "| method | lr | dev accuracy | trainable % | wall time (s) | train samples | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {r['accuracy']:.4f} | {100 * r['trainable']:.3f} | {r['wall']:.1f} | {r['samples']} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--wus-eval-every", type=int, default=10)
    ap.add_argument("--only", nargs="*", choices=[k for k, *_ in METHODS], help="run only these rows")
    args = ap.parse_args()
    _folder, tokenizer, task, base = minilm_sst2(args.max_length)
    rows = [run(*m, base, task, tokenizer, args) for m in METHODS if not args.only or m[0] in args.only]
    text = table(rows, args)
    print()
    print(text)
    if not args.only:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
