"""The interface every selective-update method implements, and the one it may ask of its host.

A host (``runtime.PolicyRuntime``: the engine's, or the one
``integrations.PolicyController`` composes in a user's own loop) owns one
instance of each registered method for the whole run; the loop that owns the
runtime calls the hooks below at fixed points.  ``configure`` is called at a step boundary
whenever the policy changes (and once at start); it may raise ``PolicyError``
to refuse a change, which then leaves the host untouched.

What a method changes of the host's own work (the loss, the forward and
backward, learning-rate factors, tensors it adds, what-if notes, ...) is a
declared hook too, with a default that changes nothing: a host calls every
method's hook and never asks for a method by name or looks a hook up.

Methods see their host only through ``Host``: a protocol, so a method cannot
reach past it into the engine or the controller, and no method imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from spu_engine.core.policy import Change, Policy, TimelineEntry
    from spu_engine.loop.distributed import Distributed
    from spu_engine.model.loading import Units
    from spu_engine.tasks import Task


class HostConfig(Protocol):
    """The run settings a method reads."""

    # the run's length in optimizer steps, None if a loop does not say (pruning warns when it cannot finish;
    # movement's warm-up is a fraction of it)
    steps: int | None
    lr: float  # default learning rate of the tensors a method adds
    seed: int
    batch_size: int  # per rank
    stats_every: int  # steps between the detailed statistics (pruning layout)


@runtime_checkable
class Host(Protocol):
    """What a method may ask of whoever trains the model."""

    model: nn.Module
    config: HostConfig
    units: Units
    params: dict[str, nn.Parameter]  # by stable name (model.stable_name)
    param_names: list[str]  # a new list whenever the module tree changed (methods cache by its identity)
    loaded_names: list[str]  # the names before any method added tensors
    clock: Callable[[], int]  # the optimizer steps taken: the step a change would apply at (what-if notes)

    @property
    def pending(self) -> Sequence[TimelineEntry]:
        """Timeline entries still to come (a replayed policy scripts what a method would otherwise decide)."""
        ...

    def add_parameters(
        self, params: list[nn.Parameter], lr: float | None = None, weight_decay: float = 0.0, name: str = "extra"
    ) -> None:
        """Train tensors the method added, as the optimizer group ``name`` (lr None: the run's)."""
        ...

    def remove_parameters(self, name: str) -> None:
        """Drop the group ``name`` and its optimizer state: the method took its tensors out again."""
        ...

    def set_group_lr(self, name: str, lr: float | None) -> None:
        """The learning rate of group ``name`` (None: the run's), before the schedule's factor."""
        ...

    def optimizer_state(self, param: nn.Parameter) -> dict[str, Any]:
        """The optimizer's state of ``param`` (AdamW's moments), live; empty before its first step or without an optimizer."""
        ...

    def forget_optimizer_state(self, params: list[nn.Parameter]) -> None:
        """These tensors start afresh in the optimizer (IMP resets survivors)."""
        ...

    def initial_model(self) -> nn.Module:
        """A fresh copy of the model as the run loaded it at step 0, before any method changed it (distillation's
        default teacher); PolicyError where the host keeps none (its message names no key: the method adds its own)."""
        ...

    def load_teacher(self, source: str) -> nn.Module:
        """The model in folder (or hub id) ``source`` with the run's task head; PolicyError saying why if it does not
        load (no key named: the method adds its own)."""
        ...

    def apply_change(self, change: Change, source: str) -> None:
        """A policy change the method decides (weight-update skipping's phase switch), recorded like any other."""
        ...

    def log(self, message: str, level: str = "info") -> None: ...

    def emit(self, type_: str, **fields: Any) -> Any: ...


class IndexStream(Protocol):
    def take(self, n: int) -> list[int]:
        """The next ``n`` training indices; the position moves on."""
        ...


@runtime_checkable
class TrainingLoop(Protocol):
    """What a method that replaces the forward and backward pass needs (selective backprop): the engine's
    ``training.Trainer``, the only one that draws data."""

    config: HostConfig
    dist: Distributed | None
    stream: IndexStream
    model: nn.Module
    task: Task

    def batch_of(self, indices: list[int]) -> dict[str, torch.Tensor]: ...

    def per_sample_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def losses_of(self, indices: list[int]) -> torch.Tensor:
        """Per-sample losses of these examples, no graph (in the run's micro-batches)."""
        ...

    def train_on(self, indices: list[int], of: float) -> torch.Tensor:
        """Forward and backward of these examples (in the run's micro-batches), gradients of a mean over ``of``."""
        ...


class Checkpointed:
    """What survives a resume: plain data (``state_dict``) and tensors (``tensor_state``); nothing by default."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint with the model (masks, scores)."""
        return {}

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors from ``tensor_state`` back from a checkpoint (after the model's weights are loaded)."""


class Method(Checkpointed):
    section: ClassVar[str]  # the policy section this method reads

    def __init__(self, host: Host) -> None:
        self.host = host

    @property
    def active(self) -> bool:
        return False

    def configure(self, policy: Policy, step: int) -> None:
        """Take the (new) policy into use at a step boundary."""

    def gate_under(self, policy: Policy) -> Callable[[str], bool] | None:
        """Which parameters (stable names) may train under ``policy``, ANDed with the freeze rules; None: no limit.

        A function of the policy alone, so the host can also say what a change *would* train before making it.
        """
        return None

    def before_step(self, step: int) -> None:
        """Called before the batch of ``step`` is drawn."""

    def after_backward(self, step: int) -> None:
        """Gradients exist; the optimizer has not stepped yet."""

    def on_gradients(self, step: int) -> None:
        """The gradients the optimizer will step on are final: averaged over ranks, unscaled, clipped."""

    def after_update(self, step: int) -> None:
        """The optimizer has stepped and the gradients are still there (AdaLoRA allocates ranks here, as peft orders it)."""

    def after_optimizer_step(self, step: int) -> None:
        """The optimizer has stepped (``step`` is the step just taken)."""

    def after_step(self, step: int, loss: float, seconds: float, began: float) -> None:
        """Step ``step`` - 1 is done: its training loss, wall time and ``time.perf_counter()`` when it began (a host
        that does not know them never calls this; the engine calls it a step late, when the loss reaches the host)."""

    def eval_due(self, step: int) -> bool:
        """Whether the host should evaluate now that ``step`` steps are taken (IMP: at each round's end)."""
        return False

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """An evaluation finished."""

    def stats(self, step: int) -> dict[str, Any]:
        """Extra fields for the event of ``step`` (the count of steps taken, as the event says)."""
        return {}

    # -- what a method changes of the host's own work (each returns None / nothing when it changes nothing) -----

    def per_sample_loss(self, loop: TrainingLoop, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """While active: the per-sample loss training minimises, when this method makes it (distillation); None: the
        task's.  The first active method that gives one decides."""
        return None

    def forward_backward(self, loop: TrainingLoop) -> tuple[torch.Tensor, int, dict[str, Any]] | None:
        """While active: one step's forward and backward in place of the plain one (selective backprop), as the loss
        (detached), the samples consumed and extra stats; None: the plain one.  The first that gives one decides."""
        return None

    def sample_selector(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For a loop that computes its own loss: per-sample losses -> a mask of the samples to backpropagate
        (selective backprop, while active); None: every sample."""
        return None

    def own_loss_warning(self, policy: Policy) -> str | None:
        """What a loop that backpropagates its own mean loss misses of this method under ``policy`` (its timeline
        included); said once when such a loop attaches."""
        return None

    def lr_multipliers(self, policy: Policy, names: list[str]) -> dict[str, float]:
        """Stable name -> a factor this method puts on the learning rate of that tensor under ``policy`` (LoRA+ on
        the B factors), on top of the ``lr`` section's; names it does not scale are left out."""
        return {}

    def lr_setting(self, policy: Policy) -> str | None:
        """The key of a setting of ``policy`` that needs per-tensor learning rates (the engine's optimizer groups),
        for a host that has none to refuse it; None: none."""
        return None

    def keeps_frozen_state(self, policy: Policy) -> set[str]:
        """Stable names of tensors whose optimizer state this method keeps while they are frozen under ``policy``, for
        when they train again (automatic freezing's ``optimizer_state: keep``); every other frozen tensor's state is
        dropped by the engine, so memory and checkpoints hold none for what does not train."""
        return set()

    def leaves_under(self, policy: Policy) -> bool:
        """Whether ``policy`` switches this method off while it has changed the model: it is configured before the
        others, so one that must go (or refuses to) does so before another adds its tensors."""
        return False

    def added_under(self, policy: Policy) -> dict[str, int]:
        """Stable name -> size of each tensor this method would add to the model under ``policy`` (what a change
        would train, previewed before it is made)."""
        return {}

    def parked_tensors(self) -> set[str]:
        """Stable names of tensors in the model that are not part of it yet (planned before sharding, switched off):
        checkpoints leave them out, so a checkpoint holds what one process's model would."""
        return set()

    def mask_fingerprints(self) -> dict[str, tuple[list[float], bool]]:
        """Each mask this method keeps: the fingerprint of the whole mask decided, and whether this rank's part still
        holds it (many ranks compare them after each change, ``loop.rank_digest``)."""
        return {}

    def plan(self, policies: list[Policy]) -> None:
        """The model is about to be sharded over ranks and will take no new tensor: build now, switched off, what
        any of ``policies`` (the one at step 0, then each the timeline reaches) would add."""

    def backward_share(self, policy: Policy) -> float | None:
        """The expected share of the samples that get a backward under ``policy`` (1: all); None: it depends on
        the losses."""
        return 1.0

    def target_sparsity(self, policy: Policy) -> float | None:
        """The share of the weights ``policy`` removes in the end; None: it prunes nothing."""
        return None

    def preview_notes(self, before: Policy, after: Policy) -> list[str]:
        """What-if notes on changing ``before`` to ``after``: what a setting does that its name does not say."""
        return []

    def collapse_note(self) -> str | None:
        """Said with the warning that the model answers every example alike: what this method means for that."""
        return None

    def exported(self, initial: Policy) -> Policy:
        """The policy at step 0 as an export writes it: a method that decides by itself marks how far its decisions
        are recorded in the timeline (auto-freeze), so a replay does not decide them again."""
        return initial
