"""Where a movement row of bench/fidelity.py collapses, step by step: the experiment behind issue 14's note.

    python bench/movement_trace.py [--row movement90] [--until 350] [--every 5] [--out bench/results/movement_trace.jsonl]

Runs the row exactly as bench/fidelity.py does (same policy, schedule, learning rates, seed) and stops after
``--until`` steps.  Every ``--every`` steps it writes one line: the batch loss, the sparsity the masks hold, how far
the scores moved since the last line, and, on 64 fixed dev sentences (eval mode, no gradient), the accuracy, the
share of them given the most common answer, and for each block's output the spread of the [CLS] vector across
the sentences (mean distance to their mean over mean norm: 0 means every sentence looks the same to the head).
Lines are flushed as they come, so a cut run keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from common import DATA, minilm_sst2
from fidelity import scaled
from fidelity_rows import FROZEN_EMBEDDINGS, ROW_BY_KEY

from spu_engine.core.model_source import offline_model_dir
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.loop.lifecycle import Stop

RUN_STEPS = 1000  # the schedule of the fidelity rows, which this run follows until --until


@torch.no_grad()
def probe(engine, batch: dict) -> dict:
    """What the head sees on the fixed sentences: accuracy, the most common answer's share, per-block [CLS] spread."""
    was_training = engine.model.training
    engine.model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = engine.model(**inputs, output_hidden_states=True)
    engine.model.train(was_training)
    predicted = out.logits.argmax(-1)
    spreads = []
    for hidden in out.hidden_states[1:]:
        cls = hidden[:, 0].float()
        spreads.append(round(float((cls - cls.mean(0)).norm(dim=-1).mean() / cls.norm(dim=-1).mean()), 4))
    return {
        "dev64_accuracy": round(float((predicted == batch["labels"]).float().mean()), 4),
        "dev64_top_answer_share": round(float(predicted.bincount(minlength=2).max()) / len(predicted), 4),
        "cls_spread_per_block": spreads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--row",
        default="movement90",
        choices=[k for k, r in ROW_BY_KEY.items() if "pruning" in r.policy and not r.distill],
    )
    parser.add_argument("--until", type=int, default=350)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "movement_trace.jsonl"
    )
    args = parser.parse_args()

    row = ROW_BY_KEY[args.row]
    _folder, tokenizer, task, base = minilm_sst2(64)
    policy = scaled(copy.deepcopy(row.policy), RUN_STEPS)
    policy["freeze"] = [FROZEN_EMBEDDINGS, *policy.get("freeze", [])]
    config = EngineConfig(
        model=str(offline_model_dir()),
        data=str(DATA),
        steps=RUN_STEPS,
        batch_size=32,
        max_length=64,
        lr=row.lr,
        warmup=0.1,
        eval_every=10**6,
        stats_every=10**6,
    )
    engine = Engine(config, parse_policy(policy), None, model=copy.deepcopy(base), tokenizer=tokenizer, task=task)
    pruning = next(m for m in engine.methods if m.section == "pruning")
    scores = getattr(pruning.pruner, "score_params", {})
    batch = {k: v.to(engine.device) for k, v in engine.task.collate(engine.task.eval[:64]).items()}
    last = {n: s.detach().clone() for n, s in scores.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = args.out.open("w")

    def sink(_line, ev):
        if ev["type"] != "step" or ev["step"] % args.every:
            return
        moved = sum(float((s.detach() - last[n]).abs().sum()) for n, s in scores.items()) / max(
            1, sum(s.numel() for s in scores.values())
        )
        for n, s in scores.items():
            last[n].copy_(s.detach())
        line = {
            "step": ev["step"],
            "loss": round(ev["loss"], 4),
            "sparsity": round(pruning.sparsity(), 4),
            "score_moved_per_step": moved / args.every,
            "score_abs_mean": float(torch.cat([s.detach().abs().flatten() for s in scores.values()]).mean())
            if scores
            else None,
            **probe(engine, batch),
        }
        out.write(json.dumps(line) + "\n")
        out.flush()
        print(
            f"step {line['step']:4d}  loss {line['loss']:.3f}  sparsity {line['sparsity']:.3f}  dev64 {line['dev64_accuracy']:.3f}  "
            f"top answer {line['dev64_top_answer_share']:.2f}  spread {line['cls_spread_per_block']}  scores moved {moved / args.every:.2e}",
            flush=True,
        )
        if ev["step"] >= args.until:
            engine.stop = Stop(reason=f"traced to step {args.until}")

    engine.sinks.append(sink)
    engine.run()
    engine.close()
    out.close()


if __name__ == "__main__":
    main()
