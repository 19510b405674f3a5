"""The policy: the one declarative object describing which parameters learn and how.

The console edits it, the engine applies it, YAML stores it.  A policy has a
current state (the sections below) and a ``timeline`` of changes keyed by step,
so an exported file replays a whole interactive run; its ``run:`` section holds
the run settings (model, data, steps, lr and schedule, seed, ...), so the file
replays it alone.

Timeline semantics (also used for live changes sent by the console):

* ``freeze``: rules *appended* to the freeze list (last match wins, so an
  appended rule overrides earlier ones for what it matches);
* ``set``: a partial policy merged section by section (nested mappings merge,
  lists such as ``freeze`` or ``pruning.targets`` are replaced whole).

An entry happens at a ``step``, or is a *trigger*: ``at: {epoch: N}`` (the
first step of epoch N, counted from 0) or ``when`` an evaluation metric meets
a condition.  A trigger that fires is recorded as a plain step entry, and the
trigger itself keeps the steps it fired at (``fired``), so an exported policy
replays those firings from its step entries without deciding them again.

The package: ``selectors`` (freeze and scale rules), ``sections`` (the policy's own sections), ``timeline``
(changes, entries, triggers), ``document`` (the policy, assembled with each method's section from
``methods.registry``) and ``errors``.  A method's settings live beside its code; they are re-exported here.
"""

from spu_engine.core.policy.document import (
    POLICY_VERSION,
    Policy,
    PolicyDocument,
    undo_change,
    without_overridden_decisions,
)
from spu_engine.core.policy.errors import PolicyError, format_validation_error
from spu_engine.core.policy.sections import SECTIONS, Faults, LearningRates, Memory
from spu_engine.core.policy.selectors import FreezeRule, ScaleRule, Selector
from spu_engine.core.policy.timeline import COMPARISONS, At, Change, MetricCondition, TimelineEntry, timeline_order
from spu_engine.methods.auto_freeze.settings import AutoFreeze
from spu_engine.methods.distillation.settings import Distillation
from spu_engine.methods.peft.settings import Peft
from spu_engine.methods.pruning.settings import IMPSettings, MovementSettings, Pruning, PruningSchedule
from spu_engine.methods.selective_backprop.settings import SelectiveBackprop
from spu_engine.methods.weight_update_skipping.settings import WeightUpdateSkipping

__all__ = [
    "COMPARISONS",
    "POLICY_VERSION",
    "SECTIONS",
    "At",
    "AutoFreeze",
    "Change",
    "Distillation",
    "Faults",
    "FreezeRule",
    "IMPSettings",
    "LearningRates",
    "Memory",
    "MetricCondition",
    "MovementSettings",
    "Peft",
    "Policy",
    "PolicyDocument",
    "PolicyError",
    "Pruning",
    "PruningSchedule",
    "ScaleRule",
    "SelectiveBackprop",
    "Selector",
    "TimelineEntry",
    "WeightUpdateSkipping",
    "format_validation_error",
    "timeline_order",
    "undo_change",
    "without_overridden_decisions",
]
