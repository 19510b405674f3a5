"""Batches on the training side: padding features into tensors, and the seeded, resumable order of examples.

Apart from ``data.py`` (reading rows), which the console imports and which must not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def pad_collate(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack features, padding every list-valued field to the longest in the batch."""
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if isinstance(values[0], list):
            width = max(len(v) for v in values)
            fill = pad_id if key == "input_ids" else (-100 if key == "labels" else 0)
            batch[key] = torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)
        else:
            batch[key] = torch.tensor(values)
    return batch


GROUP_BATCHES = 50  # length grouping sorts within windows of this many batches (as transformers' LengthGroupedSampler)


@dataclass
class BatchStream:
    """Seeded, resumable stream of training examples: a new permutation each epoch.

    With ``lengths`` (and ``batch``, the examples a step draws), the permutation is grouped by length: cut into
    windows of ``GROUP_BATCHES`` batches, each sorted longest first, so consecutive batches hold examples of
    similar length and pad little, while the windows keep the epoch's random order."""

    size: int
    seed: int = 0
    epoch: int = 0
    position: int = 0
    lengths: list[int] | None = field(default=None, repr=False)
    batch: int = 1

    def __post_init__(self) -> None:
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor | list[int]:
        """The epoch's order: a tensor (8 bytes an example, not a list's 36: a million-row file's order is small)."""
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        permutation = torch.randperm(self.size, generator=g)
        if self.lengths is None:
            return permutation
        order = permutation.tolist()
        lengths, window = self.lengths, max(1, self.batch * GROUP_BATCHES)
        return [
            i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lambda i: -lengths[i])
        ]

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.position >= self.size:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation()
            k = min(n - len(out), self.size - self.position)
            part = self._order[self.position : self.position + k]
            out.extend(part.tolist() if isinstance(part, torch.Tensor) else part)
            self.position += k
        return out

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation()


def stream_for(task: Any, seed: int, batch: int) -> BatchStream:
    """The stream of a task's training examples, by length where the task's examples vary (``groups_by_length``)."""
    lengths = lengths_of(task.train) if task.groups_by_length else None
    return BatchStream(len(task.train), seed=seed, lengths=lengths, batch=batch)


def lengths_of(features: Any) -> list[int]:
    """Tokens of each example of a task's features: a list of dicts, or features on disk (``tasks/arrow_features``),
    which read them from the list offsets without reading a row."""
    if hasattr(features, "lengths"):
        return features.lengths()
    return [len(f["input_ids"]) for f in features]
