"""SST-2 made for timing: sentences joined in fours, so every batch fills ``max_length`` (step times differ by noise only)."""

from __future__ import annotations

import random
from pathlib import Path

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def joined_sst2(folder: Path) -> Path:
    """A train.tsv of 2,000 joined rows and a dev.tsv of 64, written to ``folder``."""
    rows = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    rng = random.Random(0)
    lines = ["sentence\tlabel"]
    for _ in range(2000):
        picked = [r.split("\t") for r in rng.sample(rows, 4)]
        lines.append(" ".join(p[0] for p in picked) + "\t" + picked[0][1])
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "dev.tsv").write_text("\n".join(lines[:65]) + "\n", encoding="utf-8")
    return folder
