"""What the engine-process benchmarks share: SST-2 made for timing, and the step events of a run as they arrive.

Sentences joined in fours fill every batch to ``max_length``, so step times differ by noise only.
"""

from __future__ import annotations

import json
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


class StepEvents:
    """Step events from events.jsonl by step, read incrementally (re-parsing the whole file would cost more than what is measured)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.events: dict[int, dict] = {}

    def last(self) -> int:
        """The newest step logged so far (reads only what was appended since the last call)."""
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
            complete = data.rfind(b"\n") + 1
            self.offset += complete
            for line in data[:complete].splitlines():
                if b'"type":"step"' in line:
                    ev = json.loads(line)
                    self.events[ev["step"]] = ev
        return max(self.events, default=0)
