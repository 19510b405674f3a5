"""Where a run ran, as far as its numbers depend on it: an export records it (``machine:`` in the policy), and a
replay says plainly when its own machine differs, since the same policy and settings then give the same losses
only to about float precision (the last decimals).

CPU kernels sum in an order that depends on the thread count (``--threads``), GPU kernels differ from CPU ones and
between GPU models, and torch and transformers change kernels between versions.  ``threads`` is also what a replay
takes by default (``--threads`` overrides): unlike a device, any machine can honour it.  Torch-free: the policy
carries it.
"""

from __future__ import annotations

from pydantic import Field

from spu_engine.core.validation import Section


class Machine(Section):
    device: str = Field(description="where the run trained: cpu, cuda, mps (the device type)")
    device_name: str | None = Field(None, description="the GPU's name (torch.cuda.get_device_name); none on a CPU")
    threads: int = Field(ge=1, description="the engine's CPU threads (torch.get_num_threads); a replay takes them")
    torch: str = Field(description="torch's version")
    transformers: str = Field(description="transformers' version")
    peft: str | None = Field(None, description="peft's version")


def differences(recorded: Machine, here: Machine) -> list[str]:
    """What differs between the machine a policy was recorded on and this one, in words ('threads 4 here, 1 there')."""
    return [
        f"{key} {getattr(here, key)} here, {getattr(recorded, key)} in the export"
        for key in Machine.model_fields
        if getattr(recorded, key) != getattr(here, key)
    ]


def replay_note(recorded: Machine | None, here: Machine) -> str | None:
    """The warning a replay gives when the machine differs; None when it is the same (the losses repeat exactly)."""
    if recorded is None:
        return None
    diff = differences(recorded, here)
    if not diff:
        return None
    return (
        f"this run replays a policy recorded on another machine ({'; '.join(diff)}): its losses and metrics may "
        "differ from the recorded run's in the last decimals"
    )
