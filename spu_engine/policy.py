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
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import RunSettings
from .writes import atomic_write_text

POLICY_VERSION = 1
# bounds checked before a policy file is turned into objects: a real policy is a few KB, about 6 levels deep
MAX_POLICY_BYTES = 1 << 20
MAX_POLICY_DEPTH = 32
MAX_POLICY_NODES = 200_000  # values after YAML aliases are expanded (an alias bomb is small on disk, huge in memory)


class PolicyError(ValueError):
    """A user error in a policy: the message names the key path and the offending value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- freeze

_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:-|\.\.)\s*(-?\d+)\s*$")


class FreezeRule(_Section):
    """Select parameters by block index, unit name and/or name glob (all given selectors must match)."""

    match: str | None = Field(None, description="glob over parameter names, e.g. '*.bias' or '*attention*'")
    layers: list[int] | None = Field(None, description="block indices; YAML may also say '0-3'. Negative counts from the end.")
    units: list[str] | None = Field(None, description="unit names: 'embeddings', 'head', 'block3'")
    trainable: bool

    @field_validator("layers", mode="before")
    @classmethod
    def _expand_ranges(cls, v: Any) -> Any:
        if isinstance(v, (int, str)):
            v = [v]
        if isinstance(v, list):
            out: list[Any] = []
            for item in v:
                if isinstance(item, str):
                    m = _RANGE.match(item)
                    if m:
                        a, b = int(m.group(1)), int(m.group(2))
                        if b < a:
                            raise ValueError(f"range {item!r} is empty: write low-high")
                        out.extend(range(a, b + 1))
                        continue
                    if item.strip().lstrip("-").isdigit():
                        out.append(int(item))
                        continue
                    raise ValueError(f"{item!r} is not a block index or a range like '0-3'")
                out.append(item)
            return out
        return v

    @field_validator("units", mode="before")
    @classmethod
    def _one_unit(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _needs_selector(self) -> "FreezeRule":
        if self.match is None and self.layers is None and self.units is None:
            raise ValueError("a freeze rule needs at least one of 'match', 'layers', 'units'")
        return self


# --------------------------------------------------------------------------- methods


class SelectiveBackprop(_Section):
    """Backward only on high-loss samples (Jiang et al. 2019)."""

    mode: Literal["off", "threshold", "percentile"] = "off"
    threshold: float = Field(0.0, ge=0.0, description="threshold mode: backward only on samples with loss >= threshold")
    keep: float = Field(0.5, gt=0.0, le=1.0, description="percentile mode: expected kept fraction; P(keep)=CDF(loss)^(1/keep-1)")
    floor: float = Field(0.05, ge=0.0, le=1.0, description="percentile mode: minimum keep probability of any sample")
    history: int = Field(1024, ge=16, description="percentile mode: number of recent losses the CDF is taken over")


class WeightUpdateSkipping(_Section):
    """Bias-only phases that end when eval loss stops improving (Safayanikoo & Akturk 2020)."""

    enabled: bool = False
    patience: int = Field(2, ge=1, description="evals without improvement before switching phase")
    last_k_blocks: int | None = Field(None, ge=1, description="bias-only phase trains biases of the last k blocks only")
    start_phase: Literal["full", "bias_only"] = Field(
        "full", description="the first phase: full (every trainable tensor updates, as in the paper) or bias_only"
    )
    phase: Literal["full", "bias_only"] | None = Field(
        None, description="the phase in force; every switch sets it and is recorded in the timeline (unset: start_phase)"
    )


class PruningSchedule(_Section):
    kind: Literal["cubic", "constant"] = "cubic"
    start_step: int = Field(0, ge=0)
    end_step: int = Field(1000, ge=0)
    every: int = Field(10, ge=1)
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    final_sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of target weights removed at end_step; must be < 1")

    @model_validator(mode="after")
    def _ordered(self) -> "PruningSchedule":
        if self.end_step < self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be >= start_step ({self.start_step})")
        return self


class IMPSettings(_Section):
    rounds: int = Field(3, ge=1)
    fraction: float = Field(0.2, gt=0.0, lt=1.0, description="fraction of remaining weights removed per round")
    round_steps: int = Field(200, ge=1, description="training steps per round")
    reset: Literal["pretrained", "rewind"] = "rewind"
    rewind_step: int | None = Field(
        None, ge=0, description="rewind: the early step whose weights survivors return to; unset: the step IMP is switched on"
    )


class MovementSettings(_Section):
    score_lr: float = Field(1e-2, gt=0.0)
    l1: float = Field(0.0, ge=0.0, description="soft movement: weight of the penalty l1 * mean(sigmoid(score))")
    threshold: float = Field(
        0.0, ge=0.0, lt=1.0, description="soft movement: starting threshold on sigmoid(score), in [0, 1); the schedule moves it to the target's"
    )


class Pruning(_Section):
    method: Literal["none", "magnitude", "imp", "movement", "soft_movement"] = Field(
        "none", description="none removes all masks; a change mid-run keeps the masks and continues from the current sparsity"
    )
    scope: Literal["global", "per_unit", "per_layer"] = Field(
        "global",
        description="global: one ranking over all targets; per_unit: every unit (block) loses the same fraction; per_layer: every target tensor does",
    )
    targets: list[str] | None = Field(
        None,
        description="globs over parameter names (only weight matrices are pruned); unset: every weight matrix inside the blocks "
        "(attention and FFN), so the head, pooler, classifier and embeddings are pruned only when a pattern names them",
    )
    exclude: list[str] = Field(
        default_factory=lambda: ["*embeddings*", "*LayerNorm*", "*layer_norm*", "*ln_*", "*norm*", "*.wte.*", "*.wpe.*", "*embed_tokens*"],
        description="globs removed from targets (embeddings and norms by default)",
    )
    structure: Literal["weights", "heads_neurons"] = Field(
        "weights",
        description="weights: single entries; heads_neurons: whole attention heads and FFN neurons (what `spu export --compact` removes)",
    )
    schedule: PruningSchedule = Field(default_factory=PruningSchedule)
    imp: IMPSettings = Field(default_factory=IMPSettings)
    movement: MovementSettings = Field(default_factory=MovementSettings)

    @model_validator(mode="after")
    def _structure_fits_method(self) -> "Pruning":
        if self.structure == "heads_neurons" and self.method == "soft_movement":
            raise ValueError("structure: heads_neurons works with magnitude, imp and movement; soft_movement thresholds single weights")
        return self


class Peft(_Section):
    method: Literal["none", "bitfit", "adapter", "ia3", "lora"] = "none"
    size: int = Field(64, ge=1, description="adapter bottleneck size")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0.0, description="LoRA alpha")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, description="LoRA / IA3 target module names (default: attention projections)")
    lr: float | None = Field(None, gt=0.0, description="learning rate of the tensors a method adds (adapters, LoRA, IA3); default: the run's lr")


class Faults(_Section):
    on_nonfinite: Literal["pause", "skip", "stop"] = "skip"


SECTIONS = ("freeze", "selective_backprop", "weight_update_skipping", "pruning", "peft", "faults")


class Change(_Section):
    """One change: freeze rules to append and/or sections to merge."""

    freeze: list[FreezeRule] = Field(default_factory=list)
    set: dict[str, Any] = Field(default_factory=dict)

    @field_validator("set")
    @classmethod
    def _known_sections(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key not in SECTIONS:
                raise ValueError(f"unknown section {key!r}; sections are {', '.join(SECTIONS)}")
        return v



class TimelineEntry(Change):
    step: int = Field(ge=0)


class Policy(_Section):
    spu_policy: Literal[1] = POLICY_VERSION
    run: RunSettings | None = Field(
        None, description="the run settings this policy was trained with; `spu train --policy FILE` uses them, command-line flags override"
    )
    freeze: list[FreezeRule] = Field(default_factory=list, description="rules in order; last match wins; default trainable")
    selective_backprop: SelectiveBackprop = Field(default_factory=SelectiveBackprop)
    weight_update_skipping: WeightUpdateSkipping = Field(default_factory=WeightUpdateSkipping)
    pruning: Pruning = Field(default_factory=Pruning)
    peft: Peft = Field(default_factory=Peft)
    faults: Faults = Field(default_factory=Faults)
    timeline: list[TimelineEntry] = Field(default_factory=list)

    @field_validator("timeline")
    @classmethod
    def _sorted(cls, v: list[TimelineEntry]) -> list[TimelineEntry]:
        return sorted(v, key=lambda e: e.step)

    # -- change algebra ------------------------------------------------------

    def state(self) -> "Policy":
        """The current sections without the timeline (and without the run settings, which never change during a run)."""
        return self.model_copy(update={"timeline": [], "run": None}, deep=True)

    def apply(self, change: Change) -> "Policy":
        """Return a new policy (timeline untouched) with ``change`` applied."""
        try:
            merged = Policy.model_validate(self._merged(change))
        except ValidationError as err:
            raise PolicyError(format_validation_error(err, "change")) from None
        return merged.model_copy(update={"timeline": self.timeline})

    def _merged(self, change: Change) -> dict[str, Any]:
        """The sections (no timeline) as plain data with ``change`` merged in, not yet validated."""
        data = self.model_dump(mode="json", exclude={"timeline"})
        data["freeze"] = data["freeze"] + [r.model_dump(mode="json", exclude_none=True) for r in change.freeze]
        for key, value in change.set.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = _deep_merge(data[key], value)
            else:
                data[key] = value
        return data

    def at_step(self, step: int) -> "Policy":
        """The sections in force at ``step`` (all timeline entries with entry.step <= step applied)."""
        p = self.state()
        for e in self.timeline:
            if e.step <= step:
                p = p.apply(e)
        return p


    # -- YAML ----------------------------------------------------------------

    def to_yaml(self) -> str:
        """Sections: only what differs from the defaults, so a file says what the user chose.

        ``run:`` is written in full, so a replay does not depend on the defaults of a later version.
        """
        head: dict[str, Any] = {"spu_policy": POLICY_VERSION}
        if self.run is not None:
            head["run"] = self.run.model_dump(mode="json")
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=True, exclude={"run", "spu_policy"})
        data["timeline"] = [
            {"step": e.step, **e.model_dump(mode="json", exclude_none=True, exclude_defaults=True, exclude={"step"})} for e in self.timeline
        ]
        if not data["timeline"]:
            del data["timeline"]
        text = yaml.safe_dump(head, sort_keys=False, default_flow_style=False, width=100)  # one run setting a line
        return text + (yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100) if data else "")

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_yaml())


def _deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _loc(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "(top level)"


def format_validation_error(err: ValidationError, source: str, prefix: str = "") -> str:
    """One line per error naming the key path (``prefix`` + the path inside the validated data) and the value."""
    lines = [f"{source}: invalid policy"]
    for e in err.errors():
        loc = prefix + _loc(tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = loc.rsplit(".", 1)[0] if "." in loc else "(top level)"
            lines.append(f"  {loc}: unknown key (not allowed in {parent})")
            continue
        value = e.get("input")
        shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def parse_policy(data: Any, source: str = "policy") -> Policy:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a policy must be a mapping of sections, got {type(data).__name__}")
    try:
        policy = Policy.model_validate(data)
    except ValidationError as err:
        raise PolicyError(format_validation_error(err, source)) from None
    if policy.timeline:
        _check_timeline(policy, data.get("timeline"), source)
    return policy


def _check_timeline(policy: Policy, raw: Any, source: str) -> None:
    """Merge every timeline entry in step order, as the run will: a ``set`` that does not make a valid policy
    fails now, naming ``timeline[i].set.<section>.<key>`` (i as in the file), not silently at its step."""
    order = list(range(len(policy.timeline)))
    if isinstance(raw, list) and len(raw) == len(order):  # the timeline is kept sorted by step; name entries as the file does
        try:
            order = sorted(order, key=lambda i: int(raw[i]["step"] if isinstance(raw[i], dict) else raw[i].step))
        except (TypeError, ValueError, KeyError, AttributeError):
            pass
    state = policy.state()
    for position, entry in enumerate(policy.timeline):
        try:
            state = Policy.model_validate(state._merged(entry))
        except ValidationError as err:
            raise PolicyError(format_validation_error(err, source, prefix=f"timeline[{order[position]}].set.")) from None



def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)  # never more than the cap, whatever the file's size
    except FileNotFoundError:
        raise PolicyError(f"{path}: no such policy file") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise PolicyError(f"{path}: cannot read policy ({exc})") from None
    _check_size(len(raw), str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: cannot read policy ({exc})") from None
    return policy_from_yaml(text, source=str(path))


def _check_size(size: int, source: str) -> None:
    if size > MAX_POLICY_BYTES:
        raise PolicyError(f"{source}: more than {MAX_POLICY_BYTES:,} bytes; a policy file may hold at most 1 MiB (a real one is a few KB)")


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a nesting cap enforced while composing, before Python's recursion limit is near."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        self.depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_POLICY_DEPTH:
                mark = self.peek_event().start_mark
                raise PolicyError(
                    f"{self.source}: nested more than {MAX_POLICY_DEPTH} levels deep at line {mark.line + 1}, column {mark.column + 1} "
                    f"(a policy needs about 6)"
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Count the values and depth the document has once every alias is expanded, without expanding it."""
    measured: dict[int, tuple[int, int]] = {}  # node -> (values, depth) of its expansion
    open_nodes: set[int] = set()

    def measure(node: yaml.Node, depth_above: int) -> tuple[int, int]:
        key = id(node)
        if key not in measured:
            if key in open_nodes:
                raise PolicyError(f"{source}: an alias refers to a node that contains it (line {node.start_mark.line + 1}); policies cannot be recursive")
            open_nodes.add(key)
            children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else (
                node.value if isinstance(node, yaml.SequenceNode) else []
            )
            count, depth = 1, 1
            for child in children:
                c, d = measure(child, depth_above + 1)
                count, depth = count + c, max(depth, d + 1)
                if count > MAX_POLICY_NODES:
                    raise PolicyError(f"{source}: more than {MAX_POLICY_NODES:,} values once YAML aliases are expanded; refused")
            open_nodes.discard(key)
            measured[key] = (count, depth)
        count, depth = measured[key]
        if depth_above + depth > MAX_POLICY_DEPTH:
            raise PolicyError(f"{source}: nested more than {MAX_POLICY_DEPTH} levels deep once YAML aliases are expanded (a policy needs about 6)")
        return count, depth

    measure(root, 0)


def policy_from_yaml(text: str, source: str = "policy") -> Policy:
    """Parse a policy file's text: size, nesting and alias expansion are bounded before any object is built."""
    _check_size(len(text.encode("utf-8", errors="replace")), source)
    loader = _BoundedLoader(text, source)
    try:
        root = loader.get_single_node()
        if root is not None:
            _check_expansion(root, source)
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"{source}: malformed YAML{where}: {problem}") from None
    finally:
        loader.dispose()
    return parse_policy(data, source)


def json_schema() -> dict[str, Any]:
    schema = Policy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "SPU policy"
    return schema


def undo_change(before: Policy, now: Policy) -> Change:
    """The change that puts back the sections of ``before`` where ``now`` differs (only what differs, so it merges)."""
    old, new = before.model_dump(mode="json"), now.model_dump(mode="json")
    return Change(set={section: _differing(old[section], new[section]) for section in SECTIONS if old[section] != new[section]})


def _differing(old: Any, now: Any) -> Any:
    """The part of ``old`` that differs from ``now`` (mappings by key; anything else whole)."""
    if isinstance(old, dict) and isinstance(now, dict):
        return {k: _differing(v, now.get(k)) for k, v in old.items() if v != now.get(k)}
    return old
