"""``--peft``, ``--prune`` and ``--freeze``: the common methods from the command line, written as the policy sections
a YAML file would hold, so a run started either way holds (and exports) the same policy.

- ``--peft lora`` / ``--peft lora:r=8,alpha=16`` -> ``peft: {method: lora, r: 8, alpha: 16}`` (any peft key);
- ``--prune magnitude:0.5`` -> ``pruning: {method: magnitude, schedule: {final_sparsity: 0.5}}`` (``50%`` too;
  ``imp`` takes no sparsity: its rounds decide);
- ``--freeze embeddings,0-3,*.bias`` -> ``freeze: [{units: [embeddings], trainable: false}, {layers: 0-3, ...},
  {match: '*.bias', ...}]``: unit names, block indices or ranges, and globs (anything with ``* ? [ .``).

A section the ``--policy`` file sets too is refused: the run's policy would depend on which one wins.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from spu_engine.core.policy import Policy, PolicyError
from spu_engine.core.policy_files import parse_policy

SHORTHANDS = "Method shorthands"  # the --help panel that lists them
PEFT_HELP = (
    "PEFT method as --policy's peft: section would set it: lora, adalora, adapter, ia3 or bitfit, with peft keys "
    "after a colon, e.g. lora:r=8,alpha=16 or adapter:size=32 (default: none, the policy's)"
)
PRUNE_HELP = (
    "pruning method and final sparsity as --policy's pruning: section would set them: magnitude:0.5, "
    "movement:50%, soft_movement:0.7; imp alone (its rounds decide) (default: none, the policy's)"
)
FREEZE_HELP = (
    "what does not train, as --policy's freeze: rules would say: unit names (embeddings, head, block3), block indices "
    "or ranges (0-3, -1) and parameter globs (*.bias), comma-separated (default: none, the policy's)"
)
_GLOB = re.compile(r"[*?\[.]")
_LAYERS = re.compile(r"^-?\d+(\s*(-|\.\.)\s*-?\d+)?$")


def with_shorthands(
    policy: Policy, source: Path | None, peft: str | None = None, prune: str | None = None, freeze: str | None = None
) -> Policy:
    """``policy`` with the sections the shorthands given write; PolicyError naming the flag when one is malformed or
    the policy file sets that section too."""
    given = {
        "peft": ("--peft", peft, peft_section),
        "pruning": ("--prune", prune, pruning_section),
        "freeze": ("--freeze", freeze, freeze_rules),
    }
    sections: dict[str, Any] = {}
    for section, (flag, text, parse) in given.items():
        if text is None:
            continue
        if section in policy.model_fields_set:
            raise PolicyError(
                f"{flag} {text}: {source} has a {section}: section too; say it in one place "
                f"(edit the file, or leave out {flag})"
            )
        sections[section] = parse(text, flag)
    if not sections:
        return policy
    data = policy.model_dump(mode="json", exclude_unset=True) | sections
    return parse_policy(data, source="the command line's " + ", ".join(f for f, t, _ in given.values() if t))


def peft_section(text: str, flag: str = "--peft") -> dict[str, Any]:
    """``lora:r=8,alpha=16`` -> ``{method: lora, r: 8, alpha: 16}``."""
    method, _, rest = text.partition(":")
    section: dict[str, Any] = {"method": method.strip()}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PolicyError(f"{flag} {text}: {item!r} is not key=value (e.g. {method}:r=8)")
        section[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return section


def pruning_section(text: str, flag: str = "--prune") -> dict[str, Any]:
    """``magnitude:0.5`` (or ``50%``) -> ``{method: magnitude, schedule: {final_sparsity: 0.5}}``."""
    method, sep, amount = (part.strip() for part in text.partition(":"))
    if not sep:
        return {"method": method}
    if method == "imp":
        raise PolicyError(f"{flag} {text}: imp prunes by rounds (pruning.imp.rounds, .fraction); give imp alone")
    try:
        sparsity = float(amount[:-1]) / 100 if amount.endswith("%") else float(amount)
    except ValueError:
        raise PolicyError(f"{flag} {text}: {amount!r} is no sparsity; write {method}:0.5 or {method}:50%") from None
    return {"method": method, "schedule": {"final_sparsity": sparsity}}


def freeze_rules(text: str, flag: str = "--freeze") -> list[dict[str, Any]]:
    """``embeddings,0-3,*.bias`` -> a units rule, a layers rule and one rule per glob, each frozen."""
    units, layers, globs = [], [], []
    for item in filter(None, (part.strip() for part in text.split(","))):
        (layers if _LAYERS.match(item) else globs if _GLOB.search(item) else units).append(item)
    if not (units or layers or globs):
        raise PolicyError(f"{flag} {text!r}: name units (embeddings), blocks (0-3) or parameter globs (*.bias)")
    rules: list[dict[str, Any]] = [{"units": units, "trainable": False}] if units else []
    rules += [{"layers": layers, "trainable": False}] if layers else []
    return rules + [{"match": glob, "trainable": False} for glob in globs]
