"""The papers' comparisons on MiniLM / SST-2 at a budget that means something: one row per method.

Every row trains the pretrained all-MiniLM-L6-v2 for ``--steps`` (1,000) optimizer steps of batch 32 on
../shared/data/sst2/train.tsv (6,920 sentences: about 4.6 epochs), max length 64, the word embeddings frozen
(every row alike: on 2 CPU cores their AdamW update would cost a third of the step), LR warm-up over a tenth of
the run then linear decay, and is scored on all 872 sentences of dev.tsv every 200 steps and at the end.

Pruning rows prune the blocks' weight matrices on one cubic schedule (steps 100 to 900, masks every 10 steps,
a hold at the target for the last 100 steps) while they fine-tune, as Sanh et al. do, each matrix to the target
(magnitude, movement) or under one threshold (soft movement), as the reference ranks; their distillation
teacher is the full fine-tuning row's model (alpha 0.9, temperature 2, the reference's settings).

Every row pools [CLS] (``run: pooling: cls``, as every row did before pooling was a setting) except the ``-mean``
rows: full fine-tuning and the pruning family again with mean pooling, what MiniLM was trained for, to test whether
movement's collapse comes from [CLS] (issue 29); their distillation teacher is the mean-pooling full row's model.

``--seeds N`` runs each row with seeds 0 .. N-1 (the classifier head's draw, the batch order, dropout; the teacher
stays seed 0's full row); each run records which dev sentences it answered right, so the claims table
(fidelity_claims) gives each row's mean ± sd over its seeds and judges each claim by one rule (fidelity_stats):
the difference must exceed the seeds' spread and its paired-bootstrap 95 % interval must leave out zero.

Rows are appended to ``bench/results/fidelity.jsonl`` as they finish (the teacher is kept under
``bench/results/cache/``, and trained again by the full row where a fresh checkout lacks it) and a row
already there is skipped, so the table fills across several sittings;
each row records the code version (the git tree of spu_engine) it ran on, and ``--rerun-stale`` reruns the
rows of other versions.  ``bench/results/fidelity.md`` (the rows, then the claims table the README copies)
is rewritten after every row.

Time: "train s" sums the step times of the run's own events; "wall s" is the whole run (evaluations included).
While a file ``bench/results/cache/PAUSE*`` exists the run waits between two steps and that wait counts in neither, so
another job can have the machine for a while (a step under way when the file appears finishes first).

    python bench/fidelity.py                 # every missing row, in order
    python bench/fidelity.py --only full lora
    python bench/fidelity.py --seeds 3 --only full magnitude90 movement90 soft_movement90
    python bench/fidelity.py --table         # rewrite fidelity.md from the rows there are
    python bench/fidelity.py --steps 200 --device cuda --precision bf16 --out /tmp/gpu.jsonl --only full
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from common import DATA, minilm_sst2
from fidelity_claims import markdown
from fidelity_rows import DISTILL, FROZEN_EMBEDDINGS, ROW_BY_KEY, ROW_LIST, SCHEDULE, Row
from fidelity_stats import by_key

from spu_engine.core.model_source import offline_model_dir
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.model.loading import count_params

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROWS = RESULTS / "fidelity.jsonl"
TABLE = RESULTS / "fidelity.md"
CACHE = RESULTS / "cache"


def code_version() -> str:
    """The git tree of spu_engine (what the rows measure), marked when the working copy differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()

    if os.environ.get("SPU_BENCH_VERSION"):  # a machine given a copy without .git (a GPU machine): the caller says
        return os.environ["SPU_BENCH_VERSION"]
    tree = git("rev-parse", "--short", "HEAD:spu_engine") or "unknown"
    return tree + ("+dirty" if git("status", "--porcelain", "--", "../spu_engine") else "")


def read_rows(path: Path) -> dict[tuple[str, int], dict]:
    """The rows recorded, keyed (row, seed); rows from before seeds were recorded ran seed 0."""
    rows: dict[tuple[str, int], dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                row.setdefault("seed", 0)
                rows[row["key"], row["seed"]] = row  # a rerun's line comes later and wins
    return rows


def wait_while_paused() -> float:
    """Wait while any ``PAUSE*`` file exists in the cache folder (one per job that wants the machine)."""
    if not any(CACHE.glob("PAUSE*")):
        return 0.0
    t0 = time.perf_counter()
    print(f"  paused while {CACHE}/PAUSE* exists", flush=True)
    while any(CACHE.glob("PAUSE*")):
        time.sleep(2.0)
    return time.perf_counter() - t0


def teacher_dir(args, pooling: str = "cls") -> Path:
    """Where the full row of ``pooling`` keeps its model for the distillation rows of that pooling (``--teacher``,
    else beside ``--out`` when given, else the cache; mean pooling's beside cls's, named ``-mean``)."""
    base = args.teacher or (args.out.with_suffix(".teacher") if args.out else CACHE / "full-ft")
    return base if pooling == "cls" else base.with_name(base.name + "-mean")


def teacher_row(pooling: str) -> Row:
    return ROW_BY_KEY["full" if pooling == "cls" else "full-mean"]


def scaled(policy: dict, steps: int) -> dict:
    """At another ``--steps`` the pruning ramp (100 to 900 of 1,000) and AdaLoRA's phases keep their place in the run."""
    schedule = policy.get("pruning", {}).get("schedule")
    if schedule:
        schedule.update(
            start_step=SCHEDULE["start_step"] * steps // 1000, end_step=SCHEDULE["end_step"] * steps // 1000
        )
    peft = policy.get("peft", {})
    if peft.get("method") == "adalora":
        peft.update(tinit=peft["tinit"] * steps // 1000, tfinal=peft["tfinal"] * steps // 1000)
    return policy


def seeded(base, seed: int):
    """The pretrained model with the classifier head drawn from ``seed`` (seed 0: the head ``minilm_sst2`` drew)."""
    model = copy.deepcopy(base)
    if seed:
        torch.manual_seed(seed)
        model.classifier.weight.data.normal_(0.0, model.config.initializer_range)
        model.classifier.bias.data.zero_()
    return model


@torch.no_grad()
def dev_answers(engine, task) -> str:
    """Which dev sentences the trained model answers right, as a string of 0/1 in file order (what a paired
    bootstrap of two rows resamples)."""
    model = engine.model
    model.eval()
    device = next(model.parameters()).device
    right = []
    for start in range(0, len(task.eval), 64):
        batch = {k: v.to(device) for k, v in task.collate(task.eval[start : start + 64]).items()}
        logits = task.outputs(model, batch)[0]
        right += (logits.argmax(-1) == batch["labels"]).tolist()
    return "".join("1" if r else "0" for r in right)


def run_row(row: Row, base, task, tokenizer, args, version: str, seed: int = 0) -> dict:
    policy = scaled(copy.deepcopy(row.policy), args.steps)
    policy["freeze"] = [FROZEN_EMBEDDINGS, *policy.get("freeze", [])]
    if row.distill:
        policy["distillation"] = {**DISTILL, "teacher": str(teacher_dir(args, row.pooling))}
    config = EngineConfig(
        model=str(offline_model_dir()),
        data=str(DATA),
        steps=args.steps,
        batch_size=32,
        max_length=64,
        lr=row.lr,
        warmup=0.1,
        eval_every=args.eval_every or max(1, args.steps // 5),
        device=args.device,
        precision=args.precision,
        seed=seed,
        **{"stats_every": 10**6, "pooling": "cls", **row.extra},
    )
    engine = Engine(config, parse_policy(policy), None, model=seeded(base, seed), tokenizer=tokenizer, task=task)
    steps: list[dict] = []
    evals: list[dict] = []
    paused = [0.0]

    def sink(_line, ev):
        if ev["type"] == "step":
            steps.append(ev)
            if ev["step"] % 100 == 0:
                print(
                    f"  step {ev['step']}  loss {ev['loss']:.4f}  train {sum(s['step_time'] for s in steps):.0f} s",
                    flush=True,
                )
            paused[0] += wait_while_paused()  # between two steps: the next step's clock has not started
        elif ev["type"] == "eval":
            evals.append(
                {
                    "step": ev["step"],
                    "train_s": round(sum(s["step_time"] for s in steps), 1),
                    "accuracy": ev["accuracy"],
                    **score_statistics(engine),
                }
            )

    engine.sinks.append(sink)
    total_params = count_params(engine.model)
    t0 = time.perf_counter()
    engine.run()
    wall = time.perf_counter() - t0 - paused[0]
    pruning_method = next((m for m in engine.methods if m.section == "pruning"), None)
    sparsity = pruning_method.sparsity() if pruning_method is not None and pruning_method.active else None
    correct = dev_answers(engine, task)
    if abs(correct.count("1") / len(correct) - evals[-1]["accuracy"]) > 1e-6:
        print(
            f"  note: the recorded answers score {correct.count('1') / len(correct):.4f}, the run's eval {evals[-1]['accuracy']:.4f}"
        )
    if row is teacher_row(row.pooling) and seed == 0:
        engine.model.save_pretrained(teacher_dir(args, row.pooling))
        tokenizer.save_pretrained(teacher_dir(args, row.pooling))
    engine.close()
    return {
        "key": row.key,
        "seed": seed,
        "pooling": row.pooling,
        "accuracy": evals[-1]["accuracy"],
        "correct": correct,
        "trainable": statistics.mean(s["trainable"] for s in steps) / total_params,
        "sparsity": sparsity,
        "train_s": round(sum(s["step_time"] for s in steps), 1),
        "wall_s": round(wall, 1),
        "samples": steps[-1]["samples"],
        "distill_kl": steps[-1].get("distill_kl"),
        "evals": evals,
        "steps": args.steps,
        "device": (f"{args.device} {args.precision}" if args.device != "cpu" else f"cpu x{torch.get_num_threads()}")
        + (f", {args.note}" if args.note else ""),
        "version": version,
        "finished": time.strftime("%Y-%m-%d %H:%M"),
    }


@torch.no_grad()
def score_statistics(engine) -> dict:
    """Movement rows: how far the learned scores have moved and how much the kept weights agree with magnitude's
    choice at the same sparsity (1.0: movement keeps exactly the largest weights), the evidence the note needs."""
    pm = next((m for m in engine.methods if m.section == "pruning"), None)
    scores = getattr(getattr(pm, "pruner", None), "score_params", None)
    if not scores:
        return {}
    flat = torch.cat([s.detach().flatten() for s in scores.values()])
    out = {"score_abs_mean": float(flat.abs().mean()), "score_positive": float((flat > 0).float().mean())}
    keep = torch.cat(
        [
            pm.masks.keep(n).flatten()
            if n in pm.masks.masks
            else torch.ones(scores[n].numel(), dtype=torch.bool, device=scores[n].device)
            for n in scores
        ]
    )
    kept = int(keep.sum())
    if 0 < kept < keep.numel():
        magnitude = torch.cat([pm.masks.dense(n).abs().flatten() for n in scores])
        largest = torch.zeros_like(keep)
        largest[magnitude.topk(kept).indices] = True
        out["overlap_with_magnitude"] = float((keep & largest).sum()) / kept
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(ROW_BY_KEY), help="run only these rows, in this order")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument(
        "--seeds", type=int, default=1, help="run each row with seeds 0 .. N-1 (the head, batch order, dropout)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"])
    ap.add_argument("--rerun-stale", action="store_true", help="rerun rows recorded by another code version")
    ap.add_argument("--table", action="store_true", help="only rewrite fidelity.md from the rows recorded")
    ap.add_argument(
        "--out", type=Path, help="write rows here instead (a GPU check, another budget); the table is not touched"
    )
    ap.add_argument(
        "--teacher",
        type=Path,
        help="the full row's model for the distillation rows (default: beside --out, or the cache)",
    )
    ap.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="evaluate every this many steps (default: five times a run), e.g. to time a crossing finer",
    )
    ap.add_argument(
        "--note", default="", help="said beside the device in each row (e.g. how many runs shared the machine)"
    )
    args = ap.parse_args()
    path = args.out or ROWS
    if args.table:
        TABLE.write_text(markdown(by_key(read_rows(ROWS))))
        print(TABLE.read_text())
        return 0
    CACHE.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    _, tokenizer, task, base = minilm_sst2(64)
    version = code_version()
    todo: list[tuple[Row, int]] = []
    done = read_rows(path)
    for spec in (
        [ROW_BY_KEY[k] for k in dict.fromkeys(args.only)] if args.only else ROW_LIST
    ):  # --only: in the order given
        for seed in range(args.seeds):
            row = done.get((spec.key, seed))
            if row is None or (args.rerun_stale and row["version"] != version):
                todo.append((spec, seed))
    for pooling in ("mean", "cls"):  # a teacher a fresh checkout lacks is trained first (its row may be recorded)
        teacher = (teacher_row(pooling), 0)
        needed = any(spec.distill and spec.pooling == pooling for spec, _ in todo)
        if needed and not (teacher_dir(args, pooling) / "config.json").exists():
            todo = [teacher, *(t for t in todo if t != teacher)]
    failed: list[str] = []
    for spec, seed in todo:
        print(f"{spec.key} seed {seed}: {spec.label} ({args.steps} steps) ...", flush=True)
        try:
            row = run_row(spec, base, task, tokenizer, args, version, seed)
        except Exception:
            traceback.print_exc()
            failed.append(f"{spec.key}@{seed}")
            continue
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"  accuracy {row['accuracy']:.4f}  trainable {100 * row['trainable']:.3f} %  train {row['train_s']:.0f} s  wall {row['wall_s']:.0f} s",
            flush=True,
        )
        if not args.out:
            TABLE.write_text(markdown(by_key(read_rows(ROWS))))
    if failed:
        print(f"failed: {' '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
