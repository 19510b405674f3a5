"""``--compile``: the model compiled in place with ``torch.compile``, its recompiles counted and said.

The model is compiled with ``nn.Module.compile`` (:func:`compile_model`), which keeps the module object, its parameters
and their names: the optimizer, checkpoints, freezing and the methods' in-place wrapping (PEFT) work on it unchanged.
Dynamo compiles the model's forward at the first step, guarded on what it assumed: input sizes, the grad mode and
train/eval mode, and each parameter's ``requires_grad`` and shape.  So a change that alters what trains or wraps modules
(LoRA, adapters) makes the next forward recompile once, in each way the run calls the model (training; evaluation;
selective backprop's scoring, which runs without gradients); a second input size recompiles once more with dynamic
sizes.  Each compile is one cache entry of the compiled frame, and torch keeps at most ``recompile_limit`` of them per
frame: past that it stops compiling the frame for the rest of the run and runs configurations it has not compiled
uncompiled (eager: slower, the same results), while the ones compiled before keep their compiled code.  torch's default
limit of 8 leaves room for a handful of live changes, so the engine raises it to :data:`RECOMPILE_LIMIT`.

:class:`CompileWatch` counts compiles from torch's compilation metrics (``torch._dynamo.utils.get_compilation_metrics``:
one record per compiled frame, with the cache entries it already had), after each training step and evaluation; a
step that compiled carries ``compiled`` / ``compiles`` / ``compile_limit`` in its event and a log line says it.  Before
a change, the what-if says whether it recompiles and warns when it would pass the limit (``notes``).

Environment: ``SPU_COMPILE_BACKEND`` (default ``inductor``; ``aot_eager`` traces and differentiates the graph without
generating code, which the tests use on CPU) and ``SPU_RECOMPILE_LIMIT`` (default :data:`RECOMPILE_LIMIT`).
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from spu_engine.core.policy import Policy
    from spu_engine.runtime.policy_runtime import PolicyRuntime, Reporter

BACKEND_ENV = "SPU_COMPILE_BACKEND"
LIMIT_ENV = "SPU_RECOMPILE_LIMIT"
RECOMPILE_LIMIT = 32  # torch's default is 8: 1 first compile, 1 for dynamic sizes, 1-2 for evaluation, then changes
Key = frozenset  # what trains: (stable name, numel, trains) of every parameter
SCORING = "selective backprop's scoring"
REUSED = "compiled: the model was compiled for this trainable set before: its compiled code is used again"


def compile_backend() -> str:
    return os.environ.get(BACKEND_ENV) or "inductor"


def recompile_limit() -> int:
    value = os.environ.get(LIMIT_ENV, "")
    if value.strip().isdigit() and int(value) > 0:
        return int(value)
    return RECOMPILE_LIMIT


def compile_model(model: torch.nn.Module, backend: str | None = None, limit: int | None = None) -> None:
    """Compile ``model`` in place as the engine does (the benchmark compiles its plain loop's model with this too):
    ``model.compile`` with ``backend`` (default :func:`compile_backend`), default dynamic sizes (static first, dynamic
    after a second size) and a recompile limit of ``limit`` (default :func:`recompile_limit`) for this model's frames.

    Its compiles are its own (``isolate_recompiles``): without that, torch shares compiled code, the count towards the
    limit and the fallback past it among all models whose forward is the same function (two BERTs in one process)."""
    limit = limit or recompile_limit()
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        model.compile(backend=backend or compile_backend(), recompile_limit=limit, isolate_recompiles=True)
        return
    config = torch._dynamo.config  # older torch: one process-wide limit, under its old name before 2.6
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))
    model.compile(backend=backend or compile_backend())


def check_backend(backend: str, device: torch.device) -> None:
    """ValueError, before training starts, when inductor cannot generate code here: a C++ compiler on the CPU, Triton
    on a GPU."""
    if backend != "inductor":
        return
    try:
        if device.type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        elif device.type == "cuda":
            from torch.utils._triton import has_triton

            if not has_triton():
                raise RuntimeError("no Triton")
    except ImportError:
        return  # this torch has no such probe: compiling will say it
    except Exception:
        needs = "a C++ compiler (g++ or clang++, or $CXX)" if device.type == "cpu" else "Triton (pip install triton)"
        raise ValueError(
            f"--compile: torch's inductor backend needs {needs} on {device.type} and found none; install it, or set "
            f"{BACKEND_ENV}=aot_eager (compiles the graph without generating code: no speed-up)"
        ) from None


def compile_run(engine: Any) -> CompileWatch:
    """The engine's model compiled and watched: the trainer says its compiles, the what-if says what a change costs."""
    backend = compile_backend()
    check_backend(backend, engine.device)
    limit = recompile_limit()
    compile_model(engine.model, backend, limit)
    watch = CompileWatch(engine.runtime, engine.events, limit, backend)
    engine.hooks.compile_notes = watch.notes
    engine.trainer.compiled = watch
    engine.events.log(
        f"--compile: the model compiles at the first step (torch.compile, {backend}; slower than the rest)"
    )
    return watch


def _compilation_records() -> list[Any]:
    try:
        from torch._dynamo.utils import get_compilation_metrics
    except ImportError:  # pragma: no cover - a torch without the records: compiles go unsaid
        return []
    return get_compilation_metrics()


class CompileWatch:
    """The compiles of one model, read from torch's compilation records after each training step and evaluation."""

    def __init__(self, runtime: PolicyRuntime, reporter: Reporter, limit: int, backend: str) -> None:
        self.runtime, self.reporter, self.limit, self.backend = runtime, reporter, limit, backend
        self.frames: dict[tuple, int] = {}  # compiled frame -> its cache entries for this model
        self.keys: dict[str, Key] = {}  # "training" / "evaluation" -> what trained at its last compile
        self.seen: set[Key] = set()  # what trained at each training compile: its compiled code is kept
        self.limit_hit: int | None = None  # the step torch refused to compile past the limit
        self.scored = False  # the model compiled while selective backprop scored samples
        records = _compilation_records()
        self._last = records[-1] if records else None  # compiles before this model's are not its own

    @property
    def compiles(self) -> int:
        """The model's compiles so far, as the limit counts them: the cache entries of its busiest frame."""
        return max(self.frames.values(), default=0)

    def live_key(self) -> Key:
        return Key((n, p.numel(), p.requires_grad) for n, p in self.runtime.params.items())

    def stepped(self, step: int) -> dict[str, Any]:
        """After training step ``step``: the step event's fields when it compiled (else none), said in the log."""
        return self.looked(step, "training")

    def looked(self, step: int, mode: str) -> dict[str, Any]:
        """The compiles since the last look (they happened in ``mode``): counted, logged, and as event fields."""
        new = self._new_records()
        compiled = [
            r for r in new if getattr(r, "has_guarded_code", False) and getattr(r, "cache_size", None) is not None
        ]
        refused = [r for r in new if "recompile limit" in str(getattr(r, "fail_reason", "") or "")]
        if not compiled and not refused:
            return {}
        for r in compiled:
            frame = (r.co_filename, r.co_firstlineno, r.co_name)
            self.frames[frame] = max(self.frames.get(frame, 0), r.cache_size + 1)
        if refused and self.limit_hit is None:
            self.limit_hit = step
            self.reporter.log(
                f"step {step}: torch's recompile limit ({self.limit}) is reached: from now on a configuration of the "
                "model it has not compiled runs uncompiled (eager: slower, the same results); the ones compiled "
                f"before keep their compiled code (start a run with {LIMIT_ENV} set higher to allow more)",
                "warning",
            )
            return {"compiled": "limit", "compiles": self.compiles, "compile_limit": self.limit}
        if not compiled:
            return {}
        key, before = self.live_key(), self.keys.get(mode)
        self.keys[mode] = key
        if mode == "training":
            self.seen.add(key)
            self.scored |= self.runtime.current.selective_backprop.mode != "off"
        if before is None:
            what, word = f"compiled the model for {mode}", "compiled"
        elif before != key:
            what, word = f"recompiled the model for {mode} after the change to what trains", "recompiled"
        else:
            what, word = (
                f"recompiled the model for {mode} (new input sizes, or a forward without gradients)",
                "recompiled",
            )
        self.reporter.log(f"step {step}: {what} ({self.compiles} of the recompile limit {self.limit})")
        return {"compiled": word, "compiles": self.compiles, "compile_limit": self.limit}

    def _new_records(self) -> list[Any]:
        records = _compilation_records()
        start = 0
        if self._last is not None:  # the records are a bounded deque: find where the last look ended
            start = next((i + 1 for i in range(len(records) - 1, -1, -1) if records[i] is self._last), 0)
        if records:
            self._last = records[-1]
        return records[start:]

    def notes(self, names: list[str], sizes: dict[str, int], mask: dict[str, bool], policy: Policy) -> list[str]:
        """The what-if's note on a change to ``policy``, whose parameters and trainable mask are these: whether it
        recompiles, in which ways the run calls the model, and whether that would pass the limit."""
        if not self.compiles:
            return []  # nothing compiled yet: the first step compiles whatever is in force then
        key = Key((n, sizes.get(n, 0), bool(mask.get(n))) for n in names)
        scores = policy.selective_backprop.mode != "off"  # its scoring forward runs without gradients
        if key == self.live_key() or key in self.seen:
            ways = [SCORING] if scores and not self.scored else []
        else:
            ways = ["training", *(["evaluation"] if "evaluation" in self.keys else []), *([SCORING] if scores else [])]
        if not ways:
            return [REUSED] if key != self.live_key() else []
        if self.limit_hit is not None:
            return [
                f"compiled: torch's recompile limit ({self.limit}) was reached at step {self.limit_hit}: the model runs "
                "uncompiled (eager: slower, the same results) in any configuration it did not compile before"
            ]
        k, n = self.compiles, len(ways)
        if ways == [SCORING]:
            what = "turns on selective backprop, whose scoring runs the model without gradients: it compiles once more"
        else:
            what = "recompiles the model " + (
                "once" if n == 1 else f"once in each way the run calls it ({', '.join(ways)})"
            )
        if k + n > self.limit:
            passing = " and ".join(ways[max(0, self.limit - k) :])
            return [
                f"compiled: this change would pass torch's recompile limit ({k} of {self.limit} compiles so far; it "
                f"{what}, and {passing} would pass it): past the limit torch runs the model uncompiled (eager: slower, "
                "the same results) in every configuration it has not compiled yet, for the rest of the run (start it "
                f"with {LIMIT_ENV} set higher to allow more)"
            ]
        return [f"compiled: this change {what} ({k} of the recompile limit {self.limit} so far)"]
