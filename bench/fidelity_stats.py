"""How sure a comparison of two fidelity rows is: the spread of each row over its seeds, and a paired bootstrap of
their difference over the dev sentences both answered (one accuracy on SST-2's 872 sentences has a standard error of
about 1.1 points, so a half-point gap from one run says nothing).

The rule every claim follows (the README says it too): a difference counts when it is larger than either row's
spread over seeds (their standard deviation) and its 95 % interval leaves out zero.  The interval is the paired
bootstrap's where both rows recorded their answers for the same seeds (resampling sentences, the seeds' mean
difference each time), else a normal approximation from the seeds' spread (or, with one seed, the binomial error).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
Z95 = 1.96


@dataclass
class Seeds:
    """One row's runs, one per seed (lines of fidelity.jsonl)."""

    key: str
    runs: list[dict]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def accuracy(self) -> float:
        return statistics.mean(r["accuracy"] for r in self.runs)

    @property
    def sd(self) -> float | None:
        """The accuracies' standard deviation over seeds; None with one seed."""
        return statistics.stdev(r["accuracy"] for r in self.runs) if self.n > 1 else None

    def said(self, scale: float = 100.0, digits: int = 1) -> str:
        """'87.8 ± 0.4 (3 seeds)', or '87.8 (1 seed)'."""
        spread = "" if self.sd is None else f" ± {scale * self.sd:.{digits}f}"
        return f"{scale * self.accuracy:.{digits}f}{spread} ({self.n} seed{'s' if self.n > 1 else ''})"

    def pooled(self) -> dict:
        """The row as one run: accuracy, trainable share, sparsity and times averaged over seeds, the evaluations
        averaged step by step (the first seed's where the seeds' grids differ)."""
        first = self.runs[0]
        out = {**first, "accuracy": self.accuracy}
        for k in ("trainable", "sparsity", "train_s", "wall_s"):
            values = [r[k] for r in self.runs if r.get(k) is not None]
            out[k] = statistics.mean(values) if values else None
        grids = [[e["step"] for e in r["evals"]] for r in self.runs]
        if all(g == grids[0] for g in grids):
            out["evals"] = [
                {
                    "step": e["step"],
                    **{k: statistics.mean(r["evals"][i][k] for r in self.runs) for k in ("accuracy", "train_s")},
                }
                for i, e in enumerate(first["evals"])
            ]
        return out


def by_key(rows: dict[tuple[str, int], dict]) -> dict[str, Seeds]:
    """Rows keyed (row, seed) as each row's ``Seeds``, seeds in order."""
    out: dict[str, Seeds] = {}
    for (key, _), run in sorted(rows.items()):
        out.setdefault(key, Seeds(key, [])).runs.append(run)
    return out


@dataclass
class Difference:
    """``a`` minus ``b`` in accuracy (0-1): its mean, 95 % interval, the larger seed spread, and how it was found."""

    mean: float
    low: float
    high: float
    spread: float | None
    how: str

    def clear(self) -> bool:
        """Above zero beyond the noise: the interval leaves out zero and the gap exceeds the seeds' spread."""
        return self.low > 0 and (self.spread is None or self.mean > self.spread)

    def said(self) -> str:
        return f"Δ {100 * self.mean:+.1f} points, {self.interval()}"

    def interval(self) -> str:
        spread = "" if self.spread is None else f", seeds' sd up to {100 * self.spread:.1f}"
        return f"95 % {100 * self.low:+.1f} to {100 * self.high:+.1f} ({self.how}{spread})"

    def minus(self, points: float) -> Difference:
        """The same difference less ``points`` (0-1): 'behind by more than the claim's tolerance'."""
        return Difference(self.mean - points, self.low - points, self.high - points, self.spread, self.how)


def difference(a: Seeds, b: Seeds, seed: int = 0) -> Difference:
    """``a`` minus ``b``: paired bootstrap over the sentences where both recorded answers for the same seeds, else a
    normal approximation."""
    spreads = [s.sd for s in (a, b) if s.sd is not None]
    spread = max(spreads) if spreads else None
    answers_a = {r["seed"]: r["correct"] for r in a.runs if r.get("correct")}
    answers_b = {r["seed"]: r["correct"] for r in b.runs if r.get("correct")}
    common = sorted(set(answers_a) & set(answers_b))
    if common:
        ca = np.array([[c == "1" for c in answers_a[s]] for s in common], dtype=np.float32)
        cb = np.array([[c == "1" for c in answers_b[s]] for s in common], dtype=np.float32)
        per_sentence = (ca - cb).mean(0)  # the seeds' mean difference on each sentence
        rng = np.random.default_rng(seed)
        n = per_sentence.shape[0]
        means = np.concatenate(
            [per_sentence[rng.integers(0, n, size=(1000, n))].mean(1) for _ in range(RESAMPLES // 1000)]
        )
        low, high = np.quantile(means, [0.025, 0.975])
        how = f"paired bootstrap over {n} sentences, {len(common)} seed{'s' if len(common) > 1 else ''}"
        return Difference(float(per_sentence.mean()), float(low), float(high), spread, how)
    error = math.sqrt(_variance(a) + _variance(b))
    mean = a.accuracy - b.accuracy
    how = "normal approximation" + ("" if spread is not None else ", 1 seed: binomial error")
    return Difference(mean, mean - Z95 * error, mean + Z95 * error, spread, how)


def _variance(s: Seeds, sentences: int = 872) -> float:
    """The variance of a row's mean accuracy: the seeds' spread over their count, or the binomial one run has."""
    if s.sd is not None:
        return s.sd**2 / s.n
    return s.accuracy * (1 - s.accuracy) / sentences
