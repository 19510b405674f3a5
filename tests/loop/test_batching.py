"""Batches grouped by length pad little, keep every example once an epoch, and resume where they stopped."""

from __future__ import annotations

import random

from spu_engine.loop.batching import BatchStream


def _padding(stream: BatchStream, lengths: list[int], batch: int, steps: int) -> float:
    padded = real = 0
    for _ in range(steps):
        drawn = [lengths[i] for i in stream.take(batch)]
        padded += max(drawn) * len(drawn)
        real += sum(drawn)
    return 1 - real / padded


def test_grouped_batches_pad_far_less_and_cover_the_epoch():
    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(4000)]
    plain = BatchStream(len(lengths), seed=3)
    grouped = BatchStream(len(lengths), seed=3, lengths=lengths, batch=8)
    assert _padding(grouped, lengths, 8, 100) < _padding(plain, lengths, 8, 100) / 5
    epoch = BatchStream(len(lengths), seed=3, lengths=lengths, batch=8).take(len(lengths))
    assert sorted(epoch) == list(range(len(lengths)))


def test_a_grouped_stream_resumes_where_it_stopped():
    lengths = [i % 97 for i in range(1000)]
    straight = BatchStream(len(lengths), seed=1, lengths=lengths, batch=4)
    straight.take(1234)
    state = straight.state_dict()
    resumed = BatchStream(len(lengths), seed=0, lengths=lengths, batch=4)
    resumed.load_state_dict(state)
    assert resumed.take(50) == straight.take(50)
