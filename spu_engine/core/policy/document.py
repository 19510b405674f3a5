"""The policy document: its sections (the method sections from the registry), the change algebra, YAML and undo."""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator

from spu_engine.core.config import RunSettings
from spu_engine.core.machine import Machine
from spu_engine.core.policy.errors import PolicyError, format_validation_error
from spu_engine.core.policy.sections import SECTIONS, Faults, LearningRates, Memory
from spu_engine.core.policy.selectors import FreezeRule
from spu_engine.core.policy.timeline import Change, TimelineEntry, _entry_data, timeline_order
from spu_engine.core.validation import Section
from spu_engine.methods.registry import section_specs

POLICY_VERSION = 1


class PolicyDocument(Section):
    """What a policy does, whatever its sections: ``Policy`` below adds the fields, the method sections from the
    registry, so adding a method adds its section here without an edit."""

    @field_validator("timeline", check_fields=False)
    @classmethod
    def _sorted(cls, v: list[TimelineEntry]) -> list[TimelineEntry]:
        return sorted(v, key=timeline_order)

    # -- change algebra ------------------------------------------------------

    def sections(self) -> Policy:
        """The current sections without the timeline (and without the run settings, which never change during a run)."""
        return self.model_copy(update={"timeline": [], "run": None, "machine": None}, deep=True)

    def apply(self, change: Change) -> Policy:
        """Return a new policy (timeline untouched) with ``change`` applied."""
        try:
            merged = type(self).model_validate(self._merged(change))
        except ValidationError as err:
            raise PolicyError(format_validation_error(err, "change", model=type(self))) from None
        return merged.model_copy(update={"timeline": self.timeline})

    def _merged(self, change: Change) -> dict[str, Any]:
        """The sections (no timeline) as plain data with ``change`` merged in, not yet validated."""
        data = self.model_dump(mode="json", exclude={"timeline"})
        if change.freeze:
            data["freeze"] = without_overridden_decisions(
                without_repeated_selectors(
                    data["freeze"] + [r.model_dump(mode="json", exclude_none=True) for r in change.freeze]
                )
            )
        for key, value in change.set.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = _deep_merge(data[key], value)
            else:
                data[key] = value
        return data

    def at_step(self, step: int) -> Policy:
        """The sections in force at ``step`` (all timeline entries with entry.step <= step applied)."""
        p = self.sections()
        for e in self.timeline:
            if e.step is not None and e.step <= step:
                p = p.apply(e)
        return p

    # -- YAML ----------------------------------------------------------------

    def to_yaml(self) -> str:
        """Sections: only what differs from the defaults, so a file says what the user chose.

        ``run:`` is written in full, so a replay does not depend on the defaults of a later version; ``machine:``, where
        it was recorded, so a replay can say when it runs elsewhere.
        """
        head: dict[str, Any] = {"spu_policy": POLICY_VERSION}
        if self.run is not None:
            head["run"] = self.run.model_dump(mode="json")
        if self.machine is not None:
            head["machine"] = self.machine.model_dump(mode="json", exclude_none=True)
        data = self.model_dump(
            mode="json", exclude_none=True, exclude_defaults=True, exclude={"run", "machine", "spu_policy"}
        )
        data["timeline"] = [_entry_data(e) for e in self.timeline]
        if not data["timeline"]:
            del data["timeline"]
        text = yaml.safe_dump(head, sort_keys=False, default_flow_style=False, width=100)  # one run setting a line
        return text + (yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100) if data else "")


Policy = create_model(
    "Policy",
    __base__=PolicyDocument,
    __module__=__name__,
    __doc__="The policy: which parameters learn and how (see the package's docstring).",
    spu_policy=(Literal[1], POLICY_VERSION),
    run=(
        RunSettings | None,
        Field(
            None,
            description="the run settings this policy was trained with; `spu train --policy FILE` uses them, command-line "
            "flags override",
        ),
    ),
    machine=(
        Machine | None,
        Field(
            None,
            description="where the run was recorded (device, threads, versions), written by exports: a replay takes its "
            "threads (--threads overrides) and says when its machine differs, its losses then equal to float precision",
        ),
    ),
    freeze=(
        list[FreezeRule],
        Field(default_factory=list, description="rules in order; last match wins; default trainable"),
    ),
    **{name: (spec.settings, Field(default_factory=spec.settings)) for name, spec in section_specs().items()},
    faults=(Faults, Field(default_factory=Faults)),
    lr=(LearningRates, Field(default_factory=LearningRates)),
    memory=(Memory, Field(default_factory=Memory)),
    timeline=(list[TimelineEntry], Field(default_factory=list)),
)
assert tuple(k for k in Policy.model_fields if k not in ("spu_policy", "run", "machine", "timeline")) == SECTIONS


def without_repeated_selectors(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The freeze rules less those a later rule repeats the selector of (same author): the later one matches every
    tensor the earlier does and comes after it, so the earlier decides nothing (last match wins).  A tensor toggled
    32 times keeps one rule, not 32.  The first rule automatic freezing wrote stays wherever it is (it marks where
    the pinned rules begin)."""
    first_marked = next((i for i, r in enumerate(rules) if r.get("by") == "auto_freeze"), None)
    seen: set[tuple[Any, ...]] = set()
    kept: list[dict[str, Any]] = []
    for i in range(len(rules) - 1, -1, -1):
        r = rules[i]
        key = (r.get("match"), _as_set(r.get("layers")), _as_set(r.get("units")), r.get("by"))
        if key in seen and i != first_marked:
            continue
        seen.add(key)
        kept.append(r)
    return kept[::-1]


def _as_set(values: list[Any] | None) -> frozenset[Any] | None:
    return None if values is None else frozenset(values)


def without_overridden_decisions(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The freeze rules less those automatic freezing wrote that later rules override wherever they select.

    LISA and autofreeze decide whole blocks again at every decision; kept, their rules would pile up (a set per
    decision, all checked again at every change).  A rule goes only when later rules name all its blocks or all its
    units (whatever they set, the last match wins), so what trains is unchanged.  The first marked rule stays: it
    marks where the rules that take units out of automatic freezing begin (``auto_freeze._pinned``)."""
    first = next((i for i, r in enumerate(rules) if r.get("by") == "auto_freeze"), None)
    if first is None:
        return rules
    layers_after: set[int] = set()
    units_after: set[str] = set()
    dropped: set[int] = set()
    for i in range(len(rules) - 1, first, -1):
        r = rules[i]
        layers, units = r.get("layers"), r.get("units")
        if r.get("match") is None:
            if r.get("by") == "auto_freeze" and (
                (layers is not None and set(layers) <= layers_after)
                or (units is not None and set(units) <= units_after)
            ):
                dropped.add(i)
            elif units is None:
                layers_after |= set(layers or ())
            elif layers is None:
                units_after |= set(units)
    return [r for i, r in enumerate(rules) if i not in dropped]


def _deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def undo_change(before: Policy, now: Policy) -> Change:
    """The change that puts back the sections of ``before`` where ``now`` differs (only what differs, so it merges)."""
    old, new = before.model_dump(mode="json"), now.model_dump(mode="json")
    return Change(
        set={section: _differing(old[section], new[section]) for section in SECTIONS if old[section] != new[section]}
    )


def _differing(old: Any, now: Any) -> Any:
    """The part of ``old`` that differs from ``now`` (mappings by key; anything else whole)."""
    if isinstance(old, dict) and isinstance(now, dict):
        return {k: _differing(v, now.get(k)) for k, v in old.items() if v != now.get(k)}
    return old
