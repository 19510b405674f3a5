"""A change's device memory in words: the what-if's memory line, and the figures an out-of-memory message names.

One wording for the console's controls, its learning view and the engine's messages, so the numbers a person sees
before a change are the ones named when it did not fit.
"""

from __future__ import annotations

from spu_engine.core.protocol.events import MemoryFigures, MemoryPreview

UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
SHOWN_DTYPE = 0.05  # a dtype holding less of a kind than this (int64 position ids among fp32 weights) is not named


def unit_for(n: int) -> tuple[str, int]:
    return next(((name, size) for name, size in UNITS if n >= size), UNITS[-1])


def number(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def size(n: int) -> str:
    """Bytes in the largest unit they fill: ``1.42 GiB``."""
    name, scale = unit_for(n)
    return f"{number(n / scale)} {name}"


def dtypes(by_dtype: dict[str, int]) -> list[str]:
    """The dtypes that hold a visible share of one kind of memory, largest first."""
    whole = sum(by_dtype.values())
    return [d for d, n in sorted(by_dtype.items(), key=lambda kv: -kv[1]) if whole and n >= SHOWN_DTYPE * whole]


def breakdown(figures: MemoryFigures, memory: MemoryPreview, scale: int) -> str:
    """``fp32: weights 0.90, grads 0.10, AdamW 0.20; activations 0.40 from step 12`` (in the line's unit)."""
    kinds = (
        ("weights", figures.weights),
        ("grads", figures.gradients),
        (memory.optimizer or "optimizer", figures.optimizer),
    )
    named = {d for _, by in kinds for d in dtypes(by)}
    common = next(iter(named)) if len(named) == 1 else None
    parts = []
    for label, by in kinds:
        own = "" if common or not by else " " + "+".join(dtypes(by))
        parts.append(f"{label} {number(sum(by.values()) / scale)}{own}")
    if figures.activations is None:
        activations = "activations not measured yet"
    else:
        source = f" from step {memory.measured_step}" if memory.measured_step is not None else ""
        activations = f"activations {number(figures.activations / scale)}{source}"
    if memory.checkpointing:
        activations += ", checkpointing"
    return (f"{common}: " if common else "") + ", ".join(parts) + "; " + activations


def memory_line(memory: MemoryPreview) -> str:
    """``device memory 1.42 → 1.61 GiB (fp32: weights 0.90, ...) of 78.9 GiB available`` and, when the after figure
    is over what is available, a second line that says by how much."""
    before, after = memory.before.total, memory.after.total
    name, scale = unit_for(max(before, after))
    line = (
        f"{memory_kind(memory)} {number(before / scale)} → {number(after / scale)} {name} "
        f"({breakdown(memory.after, memory, scale)})"
    )
    if memory.available is not None:
        line += f" of {size(memory.available)} available"
    if memory.fits is False:
        line += "\n" + not_fitting(memory)
    return line


def short_memory(memory: MemoryPreview) -> str:
    """The figures alone, for a one-line what-if: ``device memory 1.42 → 1.61 GiB of 78.9 GiB``."""
    before, after = memory.before.total, memory.after.total
    name, scale = unit_for(max(before, after))
    line = f"{memory_kind(memory)} {number(before / scale)} → {number(after / scale)} {name}"
    if memory.available is not None:
        line += f" of {size(memory.available)}"
    return line + (" (would not fit)" if memory.fits is False else "")


def not_fitting(memory: MemoryPreview) -> str:
    short = memory.after.total - (memory.available or 0)
    return (
        f"would not fit: {size(memory.after.total)} needed, {size(memory.available or 0)} available "
        f"({size(short)} short)"
    )


def memory_kind(memory: MemoryPreview) -> str:
    return "RAM" if memory.where == "RAM" else "device memory"
