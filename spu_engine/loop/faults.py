"""What goes wrong during a run, said precisely: non-finite batches, out of memory, writes that fail.

The engine decides what to do (skip, pause, stop); this module finds where the
trouble is, frees what an out-of-memory attempt held, keeps the list of run
state that could not be written, and words each message so the user knows what
happened and what to do next.
"""

from __future__ import annotations

import gc
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spu_engine.core.writes import WriteError
from spu_engine.model.loading import Units

MAX_NONFINITE_SKIPS = 10  # "skip" turns into "stop" after this many non-finite batches in a row


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError is a RuntimeError; other backends only say "out of memory"."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def free_memory(device: torch.device) -> None:
    """Give back what a failed attempt held (its tensors are unreachable once its traceback is gone)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def oom_advice(what: str, step: int, detail: str, config: Any, run_dir: Path | None) -> tuple[str, dict[str, int]]:
    """The message for an out-of-memory pause and the smaller batch size it suggests."""
    run = run_dir or "RUN"
    if what == "evaluation":
        option, size = "eval_batch_size", max(1, config.eval_batch_size // 2)
        how = f"set eval_batch_size to {size} in {run}/config.json, then: spu train --resume {run}"
    else:
        option, size = "batch_size", max(1, config.batch_size // 2)
        how = f"spu train --resume {run} --batch-size {size}"
    message = (
        f"out of memory during {what} at step {step} ({option} {getattr(config, option)}): {detail}. "
        f"Freed gradients and cached memory and paused: resume to retry, or stop (a checkpoint is written) "
        f"and continue with a smaller batch: {how}"
    )
    return message, {option: size}


@torch.no_grad()
def nonfinite_report(
    params: dict[str, torch.nn.Parameter], units: Units, loss_value: float, step: int, bad_grads: list[str]
) -> dict[str, Any]:
    """Where the non-finite batch of step ``step`` showed: units with non-finite gradients (``bad_grads``, tensor
    names) and with non-finite weights."""
    unit_of = units.unit_of
    grads = sorted({unit_of.get(n, n) for n in bad_grads})
    bad_weights = sorted({unit_of.get(n, n) for n, p in params.items() if not torch.isfinite(p).all()})
    what = f"loss ({loss_value})" if not math.isfinite(loss_value) else f"gradient (loss {loss_value:.4g})"
    message = f"non-finite {what} in the batch of step {step}; non-finite gradients in: {', '.join(grads) or 'no unit'}"
    if bad_weights:
        message += f"; non-finite weights in: {', '.join(bad_weights)}"
    return {"message": message, "units": grads, "weights": bad_weights}


class UnwrittenState:
    """Run state that could not be written (events, config.json, policy.yaml, checkpoint), why, and how to write it.

    While anything is here the run waits paused, everything in memory, until a
    retry (automatic, `s`, or resume) writes it.  ``retry`` writes in the order
    the failures came, events first so the log keeps its order.
    """

    def __init__(self) -> None:
        self.why: dict[str, str] = {}
        self.remedy: dict[str, str] = {}  # what lets each retry succeed: free space, make a folder writable
        self._writers: dict[str, Callable[[], Any]] = {}

    def __bool__(self) -> bool:
        return bool(self.why)

    def __contains__(self, what: str) -> bool:
        return what in self.why

    def write(self, what: str, write: Callable[[], Any]) -> bool:
        """One write of run state: a ``WriteError`` is remembered instead of raised; True when it went through."""
        try:
            write()
        except WriteError as exc:
            if what not in self.why:
                print(f"spu-engine: {exc}; kept in memory until it can be written", file=sys.stderr, flush=True)
            self.why[what], self._writers[what], self.remedy[what] = str(exc), write, exc.remedy
            return False
        self.why.pop(what, None)
        self.remedy.pop(what, None)
        self._writers.pop(what, None)
        return True

    def retry(self, first: str | None = None) -> bool:
        """Every failed write again (``first`` before the others); True when nothing is left unwritten."""
        for what in sorted(self._writers, key=lambda w: w != first):
            self.write(what, self._writers[what])
        return not self.why

    def summary(self) -> str:
        return "; ".join(self.why.values())

    def pause_message(self, step: int, retry_s: float) -> str:
        remedies = " and ".join(dict.fromkeys(self.remedy.values()))  # each once, in the order the failures came
        return (
            f"{self.summary()}. Paused at step {step} with everything in memory: {remedies}, then press s (or resume) "
            f"to retry; it is also retried every {retry_s:g} s"
        )
