"""Selective backprop step time against the ideal, in the same process.

For keep 1.0, 0.5 and 0.25 (percentile mode, floor 0) the engine trains MiniLM
on SST-2.  The ideal is a plain PyTorch loop doing exactly the unavoidable
work on exactly the same samples: a no-grad forward on every drawn sample
(to score it), then forward + backward + AdamW step on the kept batch only.
The engine's draws are recorded and replayed by the plain loop, step by step,
interleaved (engine, plain, engine, ...) so outside load hits both alike.
Budget: engine / ideal <= 1.10.

    python bench/selective_backprop.py [--steps 8] [--batch-size 32] [--max-length 64]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import DATA, minilm_sst2, plain_adamw

from spu_engine.core.model_source import offline_model_dir
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.methods.selective_backprop.method import SelectiveBackprop


class IdealLoop:
    """Score every drawn chunk without a graph, then train on the kept samples: nothing more."""

    def __init__(self, model, task, config: EngineConfig) -> None:
        self.model, self.task, self.config = model.train(), task, config
        named = list(model.named_parameters())
        self.params = [p for _, p in named]
        self.opt = plain_adamw(named, config)

    def batch(self, indices):
        return self.task.collate([self.task.train[i] for i in indices])

    def step(self, drawn: list[list[int]], kept: list[int]) -> None:
        with torch.no_grad():
            for chunk in drawn:
                b = self.batch(chunk)
                logits = self.model(**{k: v for k, v in b.items() if k != "labels"}).logits
                F.cross_entropy(logits, b["labels"], reduction="none").cpu()
        self.model(**self.batch(kept)).loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def measure(keep: float, base_model, task, tokenizer, args) -> tuple[float, float, float]:
    config = EngineConfig(
        model=str(offline_model_dir()),
        data=str(DATA),
        steps=1000,
        batch_size=args.batch_size,
        max_length=args.max_length,
        eval_every=0,
        warmup=0,
    )
    policy = parse_policy({"selective_backprop": {"mode": "percentile", "keep": keep, "floor": 0.0}})
    engine = Engine(config, policy, None, model=copy.deepcopy(base_model), tokenizer=tokenizer, task=task)
    ideal = IdealLoop(copy.deepcopy(base_model), task, config)
    sb = next(m for m in engine.methods if isinstance(m, SelectiveBackprop))
    draws: list[list[int]] = []
    take = engine.stream.take
    engine.stream.take = lambda n: draws.append(take(n)) or draws[-1]  # record what the engine draws
    t_engine, t_ideal, drawn = [], [], []
    for i in range(args.warmup + args.steps):
        draws.clear()
        t0 = time.perf_counter()
        engine.boundary()
        engine.train_step()
        t1 = time.perf_counter()
        ideal.step(list(draws), sb.last_backward)
        t2 = time.perf_counter()
        if i >= args.warmup:
            t_engine.append(t1 - t0)
            t_ideal.append(t2 - t1)
            drawn.append(sum(map(len, draws)))
    engine.close()
    me, mi = statistics.median(t_engine), statistics.median(t_ideal)
    per_sample = sum(t_engine) / sum(drawn)
    print(
        f"keep {keep:<5} drawn/step {statistics.mean(drawn):6.1f}   engine {me:6.3f} s/step   ideal {mi:6.3f} s/step   "
        f"ratio {me / mi:.3f}   engine {1000 * per_sample:6.2f} ms/drawn sample",
        flush=True,
    )
    return me, mi, per_sample


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    _folder, tokenizer, task, base = minilm_sst2(args.max_length)
    print(
        f"MiniLM, SST-2, backward batch {args.batch_size}, max length {args.max_length}, {torch.get_num_threads()} threads, "
        f"median of {args.steps} interleaved steps after {args.warmup} warm-up"
    )
    rows = {keep: measure(keep, base, task, tokenizer, args) for keep in (1.0, 0.5, 0.25)}
    for keep in (0.5, 0.25):
        print(f"time per drawn sample, keep {keep} / keep 1.0: {rows[keep][2] / rows[1.0][2]:.3f}")
    worst = max(me / mi for me, mi, _ in rows.values())
    print(f"worst ratio engine/ideal: {worst:.3f} (budget 1.10)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
