"""Which parameters a policy's rules select: freeze rules and name globs resolved against a model's names.

One place for every resolution of rules against names, so the mask that trains, the check that refuses a rule
selecting nothing, and the hint naming close matches always agree.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable

from torch import nn

from spu_engine.core.policy import FreezeRule, LearningRates, Policy, PolicyError, ScaleRule, Selector
from spu_engine.methods.distillation.teacher_source import teacher_problem
from spu_engine.methods.registry import section_specs
from spu_engine.model.checkpointing import check_memory_settings
from spu_engine.model.loading import Units, stable_parameters
from spu_engine.runtime.name_hints import name_hint

_BLOCK_RE = re.compile(r"^block(\d+)$")


def globbed(names: list[str], patterns: list[str]) -> list[str]:
    """The names any of ``patterns`` matches, in their order."""
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def rule_selects(rule: Selector, name: str, units: Units) -> bool:
    """Do all of the rule's selectors (glob, units, block indices) match parameter ``name``?"""
    unit = units.unit_for(name)
    if rule.match is not None and not fnmatch.fnmatchcase(name, rule.match):
        return False
    if rule.units is not None and unit not in rule.units:
        return False
    if rule.layers is not None:
        m = _BLOCK_RE.match(unit)
        if not m:
            return False
        idx = int(m.group(1))
        wanted = {i % units.num_blocks for i in rule.layers}
        if idx not in wanted:
            return False
    return True


def freeze_mask(rules: list[FreezeRule], names: list[str], units: Units) -> dict[str, bool]:
    """name -> trainable, by the rules in order (last match wins, default trainable)."""
    out = {}
    for n in names:
        trainable = True
        for rule in rules:
            if rule_selects(rule, n, units):
                trainable = rule.trainable
        out[n] = trainable
    return out


def backward_depth(mask: dict[str, bool], units: Units) -> float:
    """The share of the blocks a backward runs through when the tensors of ``mask`` train: from the first block that
    trains to the end (a frozen prefix needs no backward and keeps no activations), all when the embeddings train."""
    training = {units.unit_for(n) for n, trains in mask.items() if trains}
    if "embeddings" in training:
        return 1.0
    blocks = [u.name for u in units if u.name.startswith("block")]
    first = next((i for i, b in enumerate(blocks) if b in training), None)
    return (len(blocks) - first) / len(blocks) if first is not None else 0.0


def decay_factor(unit: str, units: Units, decay: float) -> float:
    """Layer-wise decay: the head and the top block 1, each block below ``decay`` times the one above, embeddings one
    step below block 0."""
    if decay == 1.0:
        return 1.0
    m = _BLOCK_RE.match(unit)
    if m:
        return decay ** (units.num_blocks - 1 - int(m.group(1)))
    return decay**units.num_blocks if unit == "embeddings" else 1.0


def lr_scales(settings: LearningRates, names: list[str], units: Units) -> dict[str, float]:
    """name -> learning-rate multiplier: the decay's factor for its unit times the last scale rule that selects it."""
    out = {}
    for n in names:
        scale = 1.0
        for rule in settings.scale:
            if rule_selects(rule, n, units):
                scale = rule.scale
        out[n] = decay_factor(units.unit_for(n), units, settings.decay) * scale
    return out


def rule_problems(
    rules: list[FreezeRule] | list[ScaleRule], names: list[str], units: Units, where: str = "freeze"
) -> list[str]:
    """Every rule that selects nothing, each naming its key and what was likely meant."""
    valid_units = [u.name for u in units.units]
    problems = []
    for i, rule in enumerate(rules):
        key = f"{where}[{i}]"
        found = len(problems)
        for j, idx in enumerate(rule.layers or ()):
            if not -units.num_blocks <= idx < units.num_blocks:
                problems.append(
                    f"{key}.layers[{j}]: block index {idx} is out of range; this model has "
                    f"{units.num_blocks} blocks (0-{units.num_blocks - 1}, or negative from the end)"
                )
        for j, u in enumerate(rule.units or ()):
            if u not in valid_units:
                hint = difflib.get_close_matches(u, valid_units, n=3, cutoff=0.3)
                problems.append(
                    f"{key}.units[{j}]: unknown unit {u!r}; units are {', '.join(valid_units)}"
                    + (f" (did you mean {', '.join(map(repr, hint))}?)" if hint else "")
                )
        if rule.match is not None and not globbed(names, [rule.match]):
            problems.append(
                f"{key}.match: pattern {rule.match!r} matches no parameter of this model" + name_hint(rule.match, names)
            )
        if len(problems) == found and not any(rule_selects(rule, n, units) for n in names):
            problems.append(f"{key}: the selectors of this rule together match no parameter of this model")
    return problems


def pattern_problems(patterns: list[str], names: list[str], where: str) -> list[str]:
    """Every glob that matches no name, each naming its key and what was likely meant."""
    return [
        f"{where}[{i}]: pattern {pattern!r} matches no parameter of this model" + name_hint(pattern, names)
        for i, pattern in enumerate(patterns)
        if not globbed(names, [pattern])
    ]


def check_policy_against_model(
    policy: Policy, model: nn.Module, units: Units, names_under: Callable[[Policy], list[str]] | None = None
) -> None:
    """Every selector in the policy must select something: the state's, and each timeline entry's in the policy in force then.

    ``names_under(policy)`` gives the parameter names a policy's methods would leave in the model (PEFT adds tensors);
    without it, the model's names as they are now.
    """
    now = list(stable_parameters(model))
    names_of = names_under or (lambda _policy: now)
    in_force = policy.sections()
    names = names_of(in_force)
    check_memory_settings(policy, model)
    problems = rule_problems(in_force.freeze, names, units)
    problems += rule_problems(in_force.lr.scale, names, units, where="lr.scale")
    for section in section_specs():
        for key, patterns in getattr(in_force, section).name_globs().items():
            problems += pattern_problems(patterns, names, f"{section}.{key}")
    for t, entry in enumerate(policy.timeline):
        in_force = in_force.apply(entry)
        names = names_of(in_force)
        problems += rule_problems(entry.freeze, names, units, where=f"timeline[{t}].freeze")
        if "freeze" in entry.set:
            rules = [FreezeRule.model_validate(r) for r in entry.set["freeze"]]
            problems += rule_problems(rules, names, units, where=f"timeline[{t}].set.freeze")
        if isinstance(entry.set.get("lr"), dict) and "scale" in entry.set["lr"]:
            problems += rule_problems(in_force.lr.scale, names, units, where=f"timeline[{t}].set.lr.scale")
        for section in section_specs():
            if section in entry.set:
                for key, patterns in getattr(in_force, section).name_globs().items():
                    problems += pattern_problems(patterns, names, f"timeline[{t}].set.{section}.{key}")
        if isinstance(entry.set.get("distillation"), dict) and (missing := teacher_problem(in_force.distillation)):
            problems.append(f"timeline[{t}].set.distillation.teacher: {missing}")
    if problems:
        raise PolicyError("\n".join(problems))
