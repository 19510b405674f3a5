"""Reading a policy: from a file, YAML text or a mapping, whatever the file holds.

A hostile or broken file gets a one-line-per-problem ``PolicyError`` naming the
key path and the value, never a traceback: the file is read up to a size cap,
YAML nesting and alias expansion are capped while composing (an alias bomb is
small on disk, huge in memory), and every timeline entry is merged in step
order at load, so an entry that would not make a valid policy fails now, not
at its step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from spu_engine.core.file_kinds import not_regular
from spu_engine.core.policy import (
    Policy,
    PolicyError,
    ScaleRule,
    TimelineEntry,
    format_validation_error,
    timeline_order,
)

M = TypeVar("M", TimelineEntry, ScaleRule)

# bounds checked before a policy file is turned into objects: a real policy is a few KB, about 6 levels deep
MAX_POLICY_BYTES = 1 << 20
MAX_POLICY_DEPTH = 32
MAX_POLICY_NODES = 200_000  # values after YAML aliases are expanded (an alias bomb is small on disk, huge in memory)


def parse_policy(data: Any, source: str = "policy") -> Policy:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a policy must be a mapping of sections, got {type(data).__name__}")
    try:
        policy = Policy.model_validate(data)
    except ValidationError as err:
        raise PolicyError(format_validation_error(err, source, model=Policy)) from None
    if policy.timeline:
        _check_timeline(policy, data.get("timeline"), source)
    return policy


def _check_timeline(policy: Policy, raw: Any, source: str) -> None:
    """Merge every timeline entry in step order, then the triggers, as the run may: a ``set`` that does not make a
    valid policy fails now, naming ``timeline[i].set.<section>.<key>`` (i as in the file), not silently at its step."""
    order = list(range(len(policy.timeline)))
    if isinstance(raw, list) and len(raw) == len(
        order
    ):  # the timeline is kept sorted (timeline_order); name entries as the file does
        parsed = [TimelineEntry.model_validate(e) for e in raw]
        order = sorted(order, key=lambda i: timeline_order(parsed[i]))
    state = policy.sections()
    for position, entry in enumerate(policy.timeline):
        try:
            state = Policy.model_validate(state._merged(entry))
        except ValidationError as err:
            raise PolicyError(
                format_validation_error(err, source, prefix=f"timeline[{order[position]}].set.", model=Policy)
            ) from None


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    if (kind := not_regular(path)) is not None:  # a FIFO would block the read forever
        raise PolicyError(f"{path}: not a policy file: it is {kind}; pass a YAML file")
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
        raise PolicyError(
            f"{source}: more than {MAX_POLICY_BYTES:,} bytes; a policy file may hold at most 1 MiB (a real one is a few KB)"
        )


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
                raise PolicyError(
                    f"{source}: an alias refers to a node that contains it (line {node.start_mark.line + 1}); policies cannot be recursive"
                )
            open_nodes.add(key)
            children = (
                [n for pair in node.value for n in pair]
                if isinstance(node, yaml.MappingNode)
                else (node.value if isinstance(node, yaml.SequenceNode) else [])
            )
            count, depth = 1, 1
            for child in children:
                c, d = measure(child, depth_above + 1)
                count, depth = count + c, max(depth, d + 1)
                if count > MAX_POLICY_NODES:
                    raise PolicyError(
                        f"{source}: more than {MAX_POLICY_NODES:,} values once YAML aliases are expanded; refused"
                    )
            open_nodes.discard(key)
            measured[key] = (count, depth)
        count, depth = measured[key]
        if depth_above + depth > MAX_POLICY_DEPTH:
            raise PolicyError(
                f"{source}: nested more than {MAX_POLICY_DEPTH} levels deep once YAML aliases are expanded (a policy needs about 6)"
            )
        return count, depth

    measure(root, 0)


def policy_from_yaml(text: str, source: str = "policy") -> Policy:
    """Parse a policy file's text: size, nesting and alias expansion are bounded before any object is built."""
    return parse_policy(_bounded_yaml(text, source), source)


def entry_from_text(text: str, source: str = "trigger") -> TimelineEntry:
    """One timeline entry typed as a YAML mapping, braces optional (the console's trigger field):
    ``at: {epoch: 2}, freeze: [{units: [embeddings], trainable: false}]``.  One line naming the key when it is wrong."""
    return _mapping_from_text(text, TimelineEntry, source, "at: {epoch: 2}, freeze: [...]", name_source=False)


def scale_rule_from_text(text: str, source: str = "lr rule") -> ScaleRule:
    """One learning-rate rule typed as a YAML mapping, braces optional (the console's rule field):
    ``layers: 0-1, scale: 0.5``.  One line naming the key when it is wrong."""
    return _mapping_from_text(text, ScaleRule, source, "layers: 0-1, scale: 0.5", name_source=True)


def _mapping_from_text(text: str, model: type[M], source: str, example: str, name_source: bool) -> M:
    """A console field's one-line YAML mapping as ``model``; its first problem, key first, as the error."""
    text = text.strip()
    data = _bounded_yaml(text if text.startswith("{") else "{" + text + "}", source)
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a mapping such as {example}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = format_validation_error(err, source, model=model).splitlines()[1].strip().removeprefix("(top level): ")
        raise PolicyError(f"{source}: {first}" if name_source else first) from None


def _bounded_yaml(text: str, source: str) -> Any:
    """YAML text as data, its size, nesting and alias expansion bounded before any object is built."""
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
    return data


def json_schema() -> dict[str, Any]:
    schema = Policy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "SPU policy"
    return schema
