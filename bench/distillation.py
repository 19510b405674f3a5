"""What a distillation teacher costs per step, in the same process.

Three things take turns on MiniLM / SST-2 batches, the order rotating each round so outside load hits all alike:
the engine training with distillation (teacher ``initial``: the model as loaded, alpha 0.9, temperature 2), the
engine training without it, and a bare teacher forward (eval mode, no gradient) on a batch of the same size.
Printed: the ratio of median step times with / without, and the added time over the bare forward (1.0: the
teacher costs its forward and nothing more; the KL itself is a few hundred microseconds).

    python bench/distillation.py [--steps 12] [--batch-size 32] [--max-length 64] [--device cuda --precision bf16]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from common import DATA, minilm_sst2

from spu_engine.core.model_source import offline_model_dir
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = ap.parse_args()
    _, tokenizer, task, base = minilm_sst2(args.max_length)
    config = EngineConfig(
        model=str(offline_model_dir()),
        data=str(DATA),
        steps=1000,
        batch_size=args.batch_size,
        max_length=args.max_length,
        eval_every=0,
        stats_every=10**6,
        device=args.device,
        precision=args.precision,
    )
    plain = Engine(config, parse_policy({}), None, model=copy.deepcopy(base), tokenizer=tokenizer, task=task)
    distilled = Engine(
        config,
        parse_policy({"distillation": {"enabled": True, "alpha": 0.9, "temperature": 2.0}}),
        None,
        model=copy.deepcopy(base),
        tokenizer=tokenizer,
        task=task,
    )
    teacher = copy.deepcopy(base).to(plain.device).eval()
    batch = {k: v.to(plain.device) for k, v in task.collate(task.train[: args.batch_size]).items() if k != "labels"}

    def train(engine) -> None:
        engine.boundary()
        engine.train_step()

    @torch.no_grad()
    def forward() -> None:
        with plain._autocast():
            teacher(**batch)

    jobs = [("with", lambda: train(distilled)), ("without", lambda: train(plain)), ("forward", forward)]
    wall: dict[str, list[float]] = {name: [] for name, _ in jobs}
    for i in range(args.warmup + args.steps):
        for name, job in jobs[i % 3 :] + jobs[: i % 3]:
            t0 = time.perf_counter()
            job()
            if plain.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - t0)
    distilled.close()
    plain.close()
    w, wo, f = (statistics.median(wall[k]) for k in ("with", "without", "forward"))
    print(
        f"MiniLM, SST-2, batch {args.batch_size}, max length {args.max_length}, {args.device} {args.precision}, median of {args.steps} rotated rounds"
    )
    print(f"step with distillation {w:.3f} s, without {wo:.3f} s: ratio {w / wo:.3f}")
    print(f"bare teacher forward {f:.3f} s: the teacher adds {(w - wo) / f:.2f} x its forward")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
