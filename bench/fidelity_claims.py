"""The claims table of ``bench/fidelity.py``: each paper claim judged from its rows by one rule (fidelity_stats), and
``fidelity.md`` written from the rows there are.

Verdicts: *reproduced* (the claim holds beyond the noise, or a "within N points" gap is at most N), *not reproduced*
(the opposite holds beyond the noise, or a row collapsed to the majority class), *not shown* (inside the seeds'
spread or the interval: the runs cannot tell).
"""

from __future__ import annotations

from fidelity_rows import ROW_BY_KEY, ROW_LIST
from fidelity_stats import Seeds, difference

SCALES = "accuracy in %, gaps in points"  # the claims' wording; the rows' dev accuracy column is 0-1, as SPU reports it
MAJORITY = 444 / 872  # SST-2 dev's larger class: a model at or below this has collapsed to one answer
RULE = (
    "A difference counts when it exceeds both rows' spread over seeds (standard deviation) and its 95 % interval "
    "(a paired bootstrap over the dev sentences, where both rows recorded their answers) leaves out zero; a "
    '"within N points" claim holds when the mean gap is at most N, and fails only when the gap exceeds N beyond '
    "that noise. Rows with one seed have no spread: their interval is the bootstrap's (or the binomial error's)."
)

Verdict = tuple[str, str, str, str]  # claim, measured, verdict, why not


def time_to(row: dict, accuracy: float) -> float | None:
    """Training seconds at the first evaluation that reached ``accuracy``."""
    return next((e["train_s"] for e in row["evals"] if e["accuracy"] >= accuracy), None)


def at_chance(s: Seeds) -> bool:
    return s.accuracy <= MAJORITY + 0.005


def beats(claim: str, first: tuple[str, Seeds], second: tuple[str, Seeds], why_not: str) -> Verdict:
    """Claim ``first`` does better than ``second`` beyond the noise, against a row that learned something (beating a
    row collapsed to the majority class says nothing of the method)."""
    (a_name, a), (b_name, b) = first, second
    d = difference(a, b)
    measured = f"{a_name} {a.said()}, {b_name} {b.said()}; {d.said()}" + recovered(first, second)
    if at_chance(a) and at_chance(b):
        return claim, measured, "not reproduced", "both at chance (the majority class): nothing to compare"
    if at_chance(b):
        return claim, measured, "not shown", f"{b_name} ended at chance: beating it says nothing of {a_name}"
    if at_chance(a):
        return claim, measured, "not reproduced", f"{a_name} ended at chance (the majority class): {why_not}"
    if d.clear():
        return claim, measured, "reproduced", ""
    if difference(b, a).clear():
        return claim, measured, "not reproduced", why_not
    return claim, measured, "not shown", "inside the noise: the runs cannot tell them apart"


def within(claim: str, row: tuple[str, Seeds], reference: tuple[str, Seeds], points: float, extra: str = "") -> Verdict:
    """Claim ``row`` comes within ``points`` of ``reference``: held when the mean gap is at most that, refuted only
    when the gap exceeds it beyond the noise."""
    (name, r), (ref_name, ref) = row, reference
    gap = difference(ref, r)  # how far behind
    measured = f"{name} {r.said()} vs {ref_name} {ref.said()}; {behind(gap.mean)} ({gap.interval()}){extra}"
    if gap.mean <= points / 100:
        return claim, measured, "reproduced", ""
    if gap.minus(points / 100).clear():
        return claim, measured, "not reproduced", f"more than {points:g} point{'s' if points != 1 else ''} behind"
    return claim, measured, "not shown", f"behind by more than {points:g}, but within the noise"


def recovered(*named: tuple[str, Seeds]) -> str:
    """Which of these rows sat at the majority class at some evaluation yet ended above it: a verdict on their last
    figure rests on a recovery that one more evaluation could have missed."""
    notes = []
    for name, s in named:
        for run in s.runs:
            low = sum(e["accuracy"] <= MAJORITY + 0.005 for e in run["evals"])
            if low and run["accuracy"] > MAJORITY + 0.005:
                notes.append(
                    f"{name} (seed {run.get('seed', 0)}) at chance at {low} of {len(run['evals'])} evaluations"
                )
    return f" ({'; '.join(notes)})" if notes else ""


def behind(gap: float) -> str:
    """A gap (0-1) in points, said the way it reads: behind or ahead."""
    return f"{abs(100 * gap):.1f} points {'behind' if gap >= 0 else 'ahead'}"


def cheaper(claim: str, row: tuple[str, Seeds], full: Seeds) -> Verdict:
    """Keeps full fine-tuning's accuracy (within 1 point) in less training time."""
    r = row[1]
    verdict = within(
        claim, row, ("full", full), 1.0, extra=f"; {r.pooled()['train_s']:.0f} s vs {full.pooled()['train_s']:.0f} s"
    )
    if verdict[2] == "reproduced" and r.pooled()["train_s"] >= full.pooled()["train_s"]:
        return claim, verdict[1], "not reproduced", "no cheaper than full fine-tuning"
    return verdict


def reached(claim: str, row: Seeds, goal: float, limit: float, full: Seeds, words: tuple[str, str]) -> Verdict:
    """Reaches accuracy ``goal`` within ``limit`` training seconds (on the seeds' averaged evaluations)."""
    pooled = row.pooled()
    when = time_to(pooled, goal)
    measured = (
        f"{100 * goal:.1f} reached after {when:.0f} s of training; full fine-tuning took {full.pooled()['train_s']:.0f} s"
        if when is not None
        else f"never reached {100 * goal:.1f} (ended at {row.said()}) in {pooled['train_s']:.0f} s"
    )
    ok = when is not None and when <= limit
    return claim, measured, words[0] if ok else words[1], "" if ok else "evaluated every 200 steps: not reached sooner"


def claim_verdicts(rows: dict[str, Seeds]) -> list[Verdict]:
    """(claim, measured, verdict, why not) for every claim whose rows exist."""
    out: list[Verdict] = []
    full = rows.get("full")
    if full:
        for key in ("prefix", "bitfit", "adapter", "ia3", "lora"):
            if key in rows:
                out.append(within(ROW_BY_KEY[key].checks, (key, rows[key]), ("full", full), 1.0))
        if "sb" in rows:
            words = ("reproduced", "not reproduced")
            out.append(
                reached(ROW_BY_KEY["sb"].checks, rows["sb"], full.accuracy, full.pooled()["train_s"], full, words)
            )
        for key in ("lisa", "autofreeze", "wus"):
            if key in rows:
                out.append(cheaper(ROW_BY_KEY[key].checks, (key, rows[key]), full))
        if "moonshot" in rows:
            goal, limit = full.accuracy - 0.005, full.pooled()["train_s"] / 2
            out.append(
                reached(ROW_BY_KEY["moonshot"].checks, rows["moonshot"], goal, limit, full, ("reached", "not reached"))
            )
    for key in ("dora", "adalora"):
        if "lora" in rows and key in rows:
            out.append(within(ROW_BY_KEY[key].checks, (key, rows[key]), ("LoRA", rows["lora"]), 0.5))
    for mean, pooled in (("", ""), ("-mean", ", mean pooling")):
        out += pruning_claims(rows, mean, pooled)
    for s in (90, 97):
        for kd in ("", "-kd"):
            for method in ("movement", "soft_movement"):
                cls, mean = rows.get(f"{method}{s}{kd}"), rows.get(f"{method}{s}{kd}-mean")
                if cls and mean:
                    out.append(
                        pooling_hypothesis(
                            f"{method.replace('_', ' ')} {s} %{' + distillation' if kd else ''}", cls, mean
                        )
                    )
    return out


def pruning_claims(rows: dict[str, Seeds], mean: str, pooled: str) -> list[Verdict]:
    """Sanh et al.'s comparisons among the pruning rows of one pooling (``mean``: the key suffix, ``pooled``: said)."""
    out: list[Verdict] = []
    why = "see the note on movement at this budget"
    for s in (90, 97):
        for kd in ("", "-kd"):
            mag, mov, soft = (rows.get(f"{m}{s}{kd}{mean}") for m in ("magnitude", "movement", "soft_movement"))
            said = f"{' with distillation' if kd else ''}{pooled}"
            if mag and mov:
                claim = f"movement beats magnitude at {s} % sparsity{said} (Sanh et al. 2020)"
                out.append(beats(claim, ("movement", mov), ("magnitude", mag), why))
            if mov and soft:
                claim = f"soft movement beats movement at {s} % sparsity{said} (Sanh et al. 2020)"
                out.append(beats(claim, ("soft", soft), ("movement", mov), why))
        for method in ("magnitude", "movement", "soft_movement"):
            plain, with_teacher = rows.get(f"{method}{s}{mean}"), rows.get(f"{method}{s}-kd{mean}")
            if plain and with_teacher:
                claim = f"distillation helps {method.replace('_', ' ')} at {s} %{pooled} (Sanh et al. 2020)"
                why_kd = "the teacher's KL did not help at this budget"
                out.append(beats(claim, ("with distillation", with_teacher), ("without", plain), why_kd))
    return out


def pooling_hypothesis(row: str, cls: Seeds, mean: Seeds) -> Verdict:
    """Issue 29's hypothesis: movement collapses on MiniLM because its [CLS] vector carries little (the checkpoint
    was trained to mean-pool), so a row that collapsed with [CLS] pooling learns with mean pooling."""
    claim = f"{row}: the collapse comes from pooling [CLS] (MiniLM was trained to mean-pool), so mean pooling learns"
    d = difference(mean, cls)
    measured = f"mean {mean.said()}, cls {cls.said()}; {d.said()}" + recovered(("mean", mean), ("cls", cls))
    if at_chance(mean):
        return claim, measured, "not reproduced", "the mean-pooling row collapses too: pooling is not the cause"
    if at_chance(cls):
        return claim, measured, "reproduced", ""
    if d.clear():
        return claim, measured, "reproduced", "(neither collapsed; mean pooling better beyond the noise)"
    return claim, measured, "not shown", "neither collapsed here: nothing for pooling to explain"


def markdown(rows: dict[str, Seeds]) -> str:
    runs = [r for s in rows.values() for r in s.runs]
    versions = sorted({r["version"] for r in runs})
    devices = sorted({r["device"] for r in runs})
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
        "| row | dev accuracy (0-1), mean ± sd | seeds | trainable % | sparsity | train s | wall s "
        "| accuracy every 200 steps (%) | checks | version |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in ROW_LIST:
        s = rows.get(spec.key)
        if s is None:
            lines.append(f"| {spec.label} | not run yet | | | | | | | {spec.checks} | |")
            continue
        r = s.pooled()
        curve = " ".join(f"{100 * e['accuracy']:.1f}" for e in r["evals"])
        sparsity = f"{100 * r['sparsity']:.1f} %" if r.get("sparsity") is not None else ""
        accuracy = f"{s.accuracy:.4f}" + ("" if s.sd is None else f" ± {s.sd:.4f}")
        seeds = ", ".join(str(run.get("seed", 0)) for run in s.runs)
        row_versions = ", ".join(sorted({run["version"] for run in s.runs}))
        lines.append(
            f"| {spec.label} | {accuracy} | {seeds} | {100 * r['trainable']:.3f} | {sparsity} | {r['train_s']:.0f} | "
            f"{r['wall_s']:.0f} | {curve} | {spec.checks} | {row_versions} |"
        )
    lines += ["", "## Claims", "", RULE, ""]
    lines += [f"| claim | measured here ({SCALES}) | verdict | why not |", "|---|---|---|---|"]
    lines += [f"| {c} | {m} | {v} | {w} |" for c, m, v, w in claim_verdicts(rows)]
    return "\n".join(lines) + "\n"
