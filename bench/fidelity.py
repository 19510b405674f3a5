"""The papers' comparisons on MiniLM / SST-2 at a budget that means something: one row per method.

Every row trains the pretrained all-MiniLM-L6-v2 for ``--steps`` (1,000) optimizer steps of batch 32 on
../shared/data/sst2/train.tsv (6,920 sentences: about 4.6 epochs), max length 64, the word embeddings frozen
(every row alike: on 2 CPU cores their AdamW update would cost a third of the step), LR warm-up over a tenth of
the run then linear decay, and is scored on all 872 sentences of dev.tsv every 200 steps and at the end.

Pruning rows prune the blocks' weight matrices on one cubic schedule (steps 100 to 900, masks every 10 steps,
a hold at the target for the last 100 steps) while they fine-tune, as Sanh et al. do, each matrix to the target
(magnitude, movement) or under one threshold (soft movement), as the reference ranks; their distillation
teacher is the full fine-tuning row's model (alpha 0.9, temperature 2, the reference's settings).

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
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from common import DATA, minilm_sst2

from spu_engine.core.model_source import offline_model_dir
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.model.loading import count_params

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROWS = RESULTS / "fidelity.jsonl"
TABLE = RESULTS / "fidelity.md"
CACHE = RESULTS / "cache"

FROZEN_EMBEDDINGS = {"units": ["embeddings"], "trainable": False}
SCHEDULE = {"start_step": 100, "end_step": 900, "every": 10}
MOONSHOT = {
    "freeze": [{"layers": [0, 1, 2], "trainable": False}],
    "selective_backprop": {"mode": "percentile", "keep": 0.5},
}  # examples/policies/moonshot.yaml
DISTILL = {"enabled": True, "alpha": 0.9, "temperature": 2.0}  # teacher: the full row's model


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    policy: dict
    lr: float
    checks: str  # the paper claim this row is evidence for
    distill: bool = False
    extra: dict = field(default_factory=dict)  # engine config overrides


def pruning(method: str, sparsity: float, **movement) -> dict:
    """As the reference ranks: magnitude and movement keep the top of each matrix (its TopK and magnitude binarizers work
    per weight matrix); soft movement's one threshold on sigmoid(score) holds for all of them."""
    scope = "global" if method == "soft_movement" else "per_layer"
    return {
        "pruning": {
            "method": method,
            "scope": scope,
            "schedule": {**SCHEDULE, "final_sparsity": sparsity},
            "movement": {"score_lr": 1e-2, **movement},
        }
    }


ROW_LIST = [
    Row("full", "full fine-tuning", {}, 1e-4, "the reference every claim compares with"),
    Row(
        "prefix",
        "frozen prefix (blocks 0-2)",
        {"freeze": [{"layers": [0, 1, 2], "trainable": False}]},
        1e-4,
        "freezing the lower half of the blocks costs little accuracy (Lee et al. 2019)",
    ),
    Row(
        "bitfit",
        "BitFit",
        {"peft": {"method": "bitfit"}},
        1e-3,
        "biases alone come close to full fine-tuning (Ben Zaken et al. 2022)",
    ),
    Row(
        "adapter",
        "Houlsby adapters (64)",
        {"peft": {"method": "adapter", "size": 64}},
        1e-3,
        "adapters come within 0.4 points of full fine-tuning on GLUE (Houlsby et al. 2019)",
    ),
    Row(
        "ia3",
        "(IA)^3",
        {"peft": {"method": "ia3"}},
        3e-3,
        "rescaling vectors alone compete with full fine-tuning (Liu et al. 2022)",
    ),
    Row(
        "lora",
        "LoRA (r 8, alpha 16)",
        {"peft": {"method": "lora", "r": 8, "alpha": 16}},
        5e-4,
        "LoRA matches full fine-tuning on GLUE (Hu et al. 2021)",
    ),
    Row(
        "sb",
        "selective backprop (keep 0.5)",
        {"selective_backprop": {"mode": "percentile", "keep": 0.5}},
        1e-4,
        "reaches the baseline's accuracy in less wall time (Jiang et al. 2019)",
    ),
    Row(
        "lisa",
        "LISA (2 of 6 blocks, resampled every 50 steps)",
        {"auto_freeze": {"method": "lisa", "interval": 50, "n_layers": 2, "embeddings": False, "head": True}},
        1e-4,
        "training a few blocks sampled at random matches full fine-tuning at lower cost (Pan et al. 2024)",
    ),
    Row(
        "autofreeze",
        "AutoFreeze (checked every 100 steps)",
        {"auto_freeze": {"method": "autofreeze", "interval": 100}},
        1e-4,
        "freezing the front blocks once their gradient norm settles keeps accuracy and saves time (Liu et al. 2021)",
        extra={"stats_every": 10},
    ),
    Row(
        "dora",
        "DoRA (r 8, alpha 16)",
        {"peft": {"method": "lora", "r": 8, "alpha": 16, "use_dora": True}},
        5e-4,
        "DoRA matches or beats LoRA at the same rank (Liu et al. 2024)",
    ),
    Row(
        "adalora",
        "AdaLoRA (rank 12 to 8)",
        {"peft": {"method": "adalora", "init_r": 12, "target_r": 8, "tinit": 100, "tfinal": 200}},
        5e-4,
        "AdaLoRA's budgeted ranks match LoRA at the same budget (Zhang et al. 2023)",
    ),
    Row(
        "moonshot",
        "moonshot: blocks 0-2 frozen + selective backprop keep 0.5",
        MOONSHOT,
        1e-4,
        "within 0.5 point of full fine-tuning in at most half its wall time (issue 16's moonshot)",
    ),
    Row(
        "wus",
        "weight-update skipping",
        {"weight_update_skipping": {"enabled": True, "start_phase": "full", "patience": 1}},
        1e-4,
        "switching to bias-only updates once eval loss stalls keeps accuracy at lower cost",
    ),
    *(
        Row(
            f"{m}{int(s * 100)}{'-kd' if kd else ''}",
            f"{name} {int(s * 100)} %{' + distillation' if kd else ''}",
            pruning(m, s, **({"l1": 400.0} if m == "soft_movement" else {})),
            1e-4,
            claim,
            distill=kd,
        )
        for s in (0.9, 0.97)
        for m, name, claim in (
            ("magnitude", "magnitude", "the baseline movement pruning is measured against (Sanh et al. 2020)"),
            ("movement", "movement", "movement beats magnitude at high sparsity (Sanh et al. 2020)"),
            ("soft_movement", "soft movement", "soft movement beats movement at high sparsity (Sanh et al. 2020)"),
        )
        for kd in (False, True)
    ),
]
ROW_BY_KEY = {r.key: r for r in ROW_LIST}


def code_version() -> str:
    """The git tree of spu_engine (what the rows measure), marked when the working copy differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()

    if os.environ.get("SPU_BENCH_VERSION"):  # a machine given a copy without .git (a GPU machine): the caller says
        return os.environ["SPU_BENCH_VERSION"]
    tree = git("rev-parse", "--short", "HEAD:spu_engine") or "unknown"
    return tree + ("+dirty" if git("status", "--porcelain", "--", "../spu_engine") else "")


def read_rows(path: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["key"]] = row  # a rerun's line comes later and wins
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


def teacher_dir(args) -> Path:
    """Where the full row keeps its model for the distillation rows (``--teacher``, else beside ``--out`` when given)."""
    if args.teacher:
        return args.teacher
    return args.out.with_suffix(".teacher") if args.out else CACHE / "full-ft"


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


def run_row(row: Row, base, task, tokenizer, args, version: str) -> dict:
    policy = scaled(copy.deepcopy(row.policy), args.steps)
    policy["freeze"] = [FROZEN_EMBEDDINGS, *policy.get("freeze", [])]
    if row.distill:
        policy["distillation"] = {**DISTILL, "teacher": str(teacher_dir(args))}
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
        **{"stats_every": 10**6, **row.extra},
    )
    engine = Engine(config, parse_policy(policy), None, model=copy.deepcopy(base), tokenizer=tokenizer, task=task)
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
    if row.key == "full":
        engine.model.save_pretrained(teacher_dir(args))
        tokenizer.save_pretrained(teacher_dir(args))
    engine.close()
    return {
        "key": row.key,
        "accuracy": evals[-1]["accuracy"],
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


# ------------------------------------------------------------------------- the tables


def time_to(row: dict, accuracy: float) -> float | None:
    """Training seconds at the first evaluation that reached ``accuracy``."""
    return next((e["train_s"] for e in row["evals"] if e["accuracy"] >= accuracy), None)


SCALES = "accuracy in %, gaps in points"  # the claims' wording; the rows' dev accuracy column is 0-1, as SPU reports it
MAJORITY = 444 / 872  # SST-2 dev's larger class: a model at or below this has collapsed to one answer


def beats(claim: str, first: tuple[str, dict], second: tuple[str, dict], why_not: str) -> tuple[str, str, str, str]:
    """Claim ``first`` does better than ``second``: by half a point or more, and against a row that learned something
    (beating a row collapsed to the majority class says nothing of the method)."""
    (a_name, a), (b_name, b) = first, second
    measured = f"{a_name} {100 * a['accuracy']:.1f}, {b_name} {100 * b['accuracy']:.1f}" + at_chance(first, second)
    if max(a["accuracy"], b["accuracy"]) <= MAJORITY + 0.005:
        return claim, measured, "not reproduced", "both at chance (the majority class): nothing to compare"
    if b["accuracy"] <= MAJORITY + 0.005:
        return (
            claim,
            measured,
            "not shown",
            f"{b_name} ended at chance (the majority class): beating it says nothing of {a_name}",
        )
    if a["accuracy"] <= MAJORITY + 0.005:
        return (
            claim,
            measured,
            "not reproduced",
            f"{a_name} ended at chance (the majority class): see the note on movement at this budget",
        )
    if abs(a["accuracy"] - b["accuracy"]) < 0.005:
        return claim, measured, "not shown", "within 0.5 point: one run of each cannot tell them apart"
    ok = a["accuracy"] > b["accuracy"]
    return claim, measured, "reproduced" if ok else "not reproduced", "" if ok else why_not


def at_chance(*named: tuple[str, dict]) -> str:
    """Which of these rows sat at the majority class at some evaluation yet ended above it: a verdict on their
    last figure rests on a recovery that one more evaluation could have missed."""
    notes = []
    for name, row in named:
        low = sum(e["accuracy"] <= MAJORITY + 0.005 for e in row["evals"])
        if low and row["accuracy"] > MAJORITY + 0.005:
            notes.append(f"{name} at chance at {low} of {len(row['evals'])} evaluations")
    return f" ({'; '.join(notes)})" if notes else ""


def behind(gap: float) -> str:
    """A gap in points, said the way it reads: behind or ahead."""
    return f"{abs(gap):.1f} points {'behind' if gap >= 0 else 'ahead'}"


def claim_verdicts(rows: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    """(claim, measured, verdict, why) for every claim whose rows exist."""
    out = []
    full = rows.get("full")

    def pct(r):
        return f"{100 * r['accuracy']:.1f}"

    if full:
        for key in ("prefix", "bitfit", "adapter", "ia3", "lora"):
            r = rows.get(key)
            if r:
                gap = 100 * (full["accuracy"] - r["accuracy"])
                ok = gap <= 1.0
                out.append(
                    (
                        ROW_BY_KEY[key].checks,
                        f"{pct(r)} vs full {pct(full)} ({behind(gap)}) with {100 * r['trainable']:.2f} % trainable",
                        "reproduced" if ok else "not reproduced",
                        "" if ok else "more than 1 point behind full fine-tuning at this budget",
                    )
                )
        sb = rows.get("sb")
        if sb:
            reached = time_to(sb, full["accuracy"])
            full_time = full["train_s"]
            measured = (
                f"full fine-tuning's {pct(full)} reached after {reached:.0f} s of training, full fine-tuning took {full_time:.0f} s"
                if reached is not None
                else f"never reached full fine-tuning's {pct(full)} (ended at {pct(sb)}) in {sb['train_s']:.0f} s"
            )
            ok = reached is not None and reached < full_time
            out.append(
                (
                    ROW_BY_KEY["sb"].checks,
                    measured,
                    "reproduced" if ok else "not reproduced",
                    "" if ok else "evaluated every 200 steps: the accuracy was not reached sooner on this grid",
                )
            )
        for key in ("lisa", "autofreeze"):
            r = rows.get(key)
            if r:
                gap = 100 * (full["accuracy"] - r["accuracy"])
                cheaper = r["train_s"] < full["train_s"]
                ok = gap <= 1.0 and cheaper
                out.append(
                    (
                        ROW_BY_KEY[key].checks,
                        f"{pct(r)} vs {pct(full)} in {r['train_s']:.0f} s vs {full['train_s']:.0f} s",
                        "reproduced" if ok else "not reproduced",
                        "" if ok else ("more than 1 point behind" if gap > 1.0 else "no cheaper than full fine-tuning"),
                    )
                )
        moon = rows.get("moonshot")
        if moon:
            goal = full["accuracy"] - 0.005
            reached = time_to(moon, goal)
            ok = reached is not None and reached <= full["train_s"] / 2
            measured = (
                f"{100 * goal:.1f} reached after {reached:.0f} s of training; full fine-tuning took {full['train_s']:.0f} s"
                if reached is not None
                else f"never within 0.5 point of {pct(full)} (best {100 * max(e['accuracy'] for e in moon['evals']):.1f})"
            )
            out.append(
                (
                    ROW_BY_KEY["moonshot"].checks,
                    measured,
                    "reached" if ok else "not reached",
                    "" if ok else "evaluated every 200 steps; the closest policy found so far",
                )
            )
        wus = rows.get("wus")
        if wus:
            gap = 100 * (full["accuracy"] - wus["accuracy"])
            cheaper = wus["train_s"] < full["train_s"]
            ok = gap <= 1.0 and cheaper
            out.append(
                (
                    ROW_BY_KEY["wus"].checks,
                    f"{pct(wus)} vs {pct(full)} in {wus['train_s']:.0f} s vs {full['train_s']:.0f} s",
                    "reproduced" if ok else "not reproduced",
                    "" if ok else ("more than 1 point behind" if gap > 1.0 else "no cheaper than full fine-tuning"),
                )
            )
    lora = rows.get("lora")
    for key in ("dora", "adalora"):
        r = rows.get(key)
        if lora and r:
            gap = 100 * (lora["accuracy"] - r["accuracy"])
            ok = gap <= 0.5
            out.append(
                (
                    ROW_BY_KEY[key].checks,
                    f"{pct(r)} vs LoRA {pct(lora)} with {100 * r['trainable']:.2f} % vs {100 * lora['trainable']:.2f} % trainable",
                    "reproduced" if ok else "not reproduced",
                    "" if ok else "more than 0.5 point behind LoRA at this budget",
                )
            )
    for s in (90, 97):
        for kd in ("", "-kd"):
            mag, mov, soft = (
                rows.get(f"magnitude{s}{kd}"),
                rows.get(f"movement{s}{kd}"),
                rows.get(f"soft_movement{s}{kd}"),
            )
            with_kd = " with distillation" if kd else ""
            if mag and mov:
                out.append(
                    beats(
                        f"movement beats magnitude at {s} % sparsity{with_kd} (Sanh et al. 2020)",
                        ("movement", mov),
                        ("magnitude", mag),
                        "see the note on movement at this budget",
                    )
                )
            if mov and soft:
                out.append(
                    beats(
                        f"soft movement beats movement at {s} % sparsity{with_kd} (Sanh et al. 2020)",
                        ("soft", soft),
                        ("movement", mov),
                        "see the note on movement at this budget",
                    )
                )
        for method in ("magnitude", "movement", "soft_movement"):
            plain, kd_row = rows.get(f"{method}{s}"), rows.get(f"{method}{s}-kd")
            if plain and kd_row:
                out.append(
                    beats(
                        f"distillation helps {method.replace('_', ' ')} at {s} % (Sanh et al. 2020)",
                        ("with distillation", kd_row),
                        ("without", plain),
                        "the teacher's KL did not help at this budget",
                    )
                )
    return out


def markdown(rows: dict[str, dict]) -> str:
    versions = sorted({r["version"] for r in rows.values()})
    devices = sorted({r["device"] for r in rows.values()})
    lines = [
        "# Fidelity: the papers' comparisons on MiniLM / SST-2",
        "",
        "Written by `bench/fidelity.py` (its docstring has the setup: 1,000 steps of batch 32, max length 64, word embeddings "
        "frozen, all 872 dev sentences).  Code version(s): "
        + ", ".join(versions)
        + ("" if len(versions) <= 1 else "  **(rows from different versions: rerun with --rerun-stale)**")
        + ".  Ran on: "
        + "; ".join(devices)
        + ("" if len(devices) <= 1 else "  **(rows ran under different conditions: compare their times with care)**")
        + ".",
        "",
        "| row | dev accuracy (0-1) | trainable % | sparsity | train s | wall s | accuracy every 200 steps (%) | checks | version |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in ROW_LIST:
        r = rows.get(spec.key)
        if r is None:
            lines.append(f"| {spec.label} | not run yet | | | | | | {spec.checks} | |")
            continue
        curve = " ".join(f"{100 * e['accuracy']:.1f}" for e in r["evals"])
        sparsity = f"{100 * r['sparsity']:.1f} %" if r.get("sparsity") is not None else ""
        lines.append(
            f"| {spec.label} | {r['accuracy']:.4f} | {100 * r['trainable']:.3f} | {sparsity} | {r['train_s']:.0f} | {r['wall_s']:.0f} | "
            f"{curve} | {spec.checks} | {r['version']} |"
        )
    lines += ["", "## Claims", "", f"| claim | measured here ({SCALES}) | verdict | why not |", "|---|---|---|---|"]
    lines += [f"| {c} | {m} | {v} | {w} |" for c, m, v, w in claim_verdicts(rows)]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(ROW_BY_KEY), help="run only these rows, in this order")
    ap.add_argument("--steps", type=int, default=1000)
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
        TABLE.write_text(markdown(read_rows(ROWS)))
        print(TABLE.read_text())
        return 0
    CACHE.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    _, tokenizer, task, base = minilm_sst2(64)
    version = code_version()
    todo = []
    for spec in (
        [ROW_BY_KEY[k] for k in dict.fromkeys(args.only)] if args.only else ROW_LIST
    ):  # --only: in the order given
        row = read_rows(path).get(spec.key)
        if row is None or (args.rerun_stale and row["version"] != version):
            todo.append(spec)
    if (
        any(spec.distill for spec in todo)
        and not (teacher_dir(args) / "config.json").exists()
        and ROW_BY_KEY["full"] not in todo
    ):
        todo.insert(0, ROW_BY_KEY["full"])  # its model is the teacher (a fresh checkout has the row but not the model)
    failed: list[str] = []
    for spec in todo:
        print(f"{spec.key}: {spec.label} ({args.steps} steps) ...", flush=True)
        try:
            row = run_row(spec, base, task, tokenizer, args, version)
        except Exception:
            traceback.print_exc()
            failed.append(spec.key)
            continue
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"  accuracy {row['accuracy']:.4f}  trainable {100 * row['trainable']:.3f} %  train {row['train_s']:.0f} s  wall {row['wall_s']:.0f} s",
            flush=True,
        )
        if not args.out:
            TABLE.write_text(markdown(read_rows(ROWS)))
    if failed:
        print(f"failed: {' '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
