"""The unit tree: embeddings, every block, head, each expandable to its tensors.

Rows show trainable / frozen, parameter count and sparsity as the engine last
reported them.  Keys here only *ask* for a change (a message up to the screen);
a row marks a change on its way ("·" sent, "…" the engine has it) until the
engine answers.  Tensor names are shortened by the console's one rule
(``spu_tui.names``), kept apart from their siblings; the line under the tree
holds the cursor's full name, wrapped.  Every row's marks sit in the same
columns: each has a fixed width.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Static, Tree
from textual.widgets.tree import TreeNode

from spu_engine.core.policy import Change, FreezeRule
from spu_tui.names import shorten, shorten_all
from spu_tui.run_model import Aspect, RunModel

NARROW_BELOW = 50  # tree widths (columns) below which rows mark ● trains / ○ frozen (the title says so), not words
INDENT = 2  # columns before a row's name: a unit's expand arrow, a tensor's guide


@dataclass(frozen=True)
class Row:
    kind: str  # "unit" or "tensor"
    name: str


class UnitTree(Tree[Row]):
    WATCHES = (Aspect.UNITS,)
    BINDINGS = [
        Binding("space", "toggle_trainable", "toggle"),
        Binding("f", "freeze_to_here", "freeze ≤ here"),
        Binding("u", "unfreeze_after_here", "unfreeze > here"),
        Binding("enter,right", "expand_row", "expand", show=False),
        Binding("left", "collapse_row", "collapse", show=False),
    ]

    class ChangeRequested(Message):
        """The user asked for ``change`` (freeze rules to append), which affects ``rows``."""

        def __init__(self, change: Change, rows: list[Row]) -> None:
            super().__init__()
            self.change = change
            self.rows = rows

    def __init__(self, **kwargs) -> None:
        super().__init__("model", **kwargs)
        self.show_root = False
        self.guide_depth = 2
        self.changing: set[Row] = set()  # rows with a change on its way: "·" once sent ...
        self.queued: set[Row] = set()  # ... and "…" once the engine has it, until it applies it
        self._state: RunModel | None = None
        self._row_nodes: dict[Row, TreeNode[Row]] = {}
        self._shown: dict[Row, tuple[str, int]] = {}  # each row's shortened name and count, as the last pass left them
        self._drawn: dict[Row, tuple[str, str, str, str]] = {}  # each row's label as drawn, in parts (``_parts``)
        self._narrow = False
        self.full_name = Static("", id="tree-name")  # the cursor's row by its full name (the screen places it)

    # -- drawing (called by the screen) -------------------------------------

    def show(self, state: RunModel) -> None:
        self._state = state
        self._sync_rows(state)
        self.relabel()

    def _sync_rows(self, state: RunModel) -> None:
        """Rows follow the units the engine last described: new tensors (a PEFT method's) appear, removed ones go."""
        wanted = {Row("unit", u.name): [Row("tensor", p.name) for p in u.params] for u in state.units}
        if list(wanted) == [r for r in self._row_nodes if r.kind == "unit"] and all(
            [c.data for c in self._row_nodes[unit].children] == tensors for unit, tensors in wanted.items()
        ):
            return
        self._drawn.clear()  # rows added again start from their bare names
        first = not self._row_nodes
        for row in [r for r in self._row_nodes if r.kind == "unit" and r not in wanted]:
            self._row_nodes.pop(row).remove()
        for unit, tensors in wanted.items():
            node = self._row_nodes.get(unit)
            if node is None:
                node = self._row_nodes[unit] = self.root.add(Text(unit.name), data=unit)
            have = [c.data for c in node.children]
            if have == tensors:
                continue
            for child in list(node.children):  # rebuilt in model order
                self._row_nodes.pop(child.data, None)
                child.remove()
            for row in tensors:
                self._row_nodes[row] = node.add_leaf(Text(row.name), data=row)
        self._row_nodes = {r: n for r, n in self._row_nodes.items() if r.kind == "tensor" or r in wanted}
        if first and self._row_nodes:
            self.root.expand()
            self.move_cursor_to_line(0)

    def relabel(self) -> None:
        """Relabel the rows whose text changed (each new label costs the tree a repaint of its line); every name is
        shortened again against its siblings, so this is a frame's work, not a key's (``_relabel_rows``)."""
        if self._state is None:
            return
        width = max(24, self.size.width - 1 if self.size.width else 34)  # 1 for a scrollbar
        narrow = self._narrow = width < NARROW_BELOW
        title = "units ● trains ○ frozen" if narrow else "units"
        if self.border_title != title:  # setting it, even to the same words, repaints every row
            self.border_title = title
        tail = len(self._tail(1.0, 0, 0.0, narrow))
        self._shown.clear()
        for u in self._state.units:
            unit = Row("unit", u.name)
            self._shown[unit] = (shorten(u.name, width - INDENT - tail - 1), u.numel)
            prefix = _common_prefix([p.name for p in u.params])
            ranks = [
                self._state.ranks.get(p.name.removesuffix(".lora_E")) if p.name.endswith(".lora_E") else None
                for p in u.params
            ]
            room = width - INDENT - tail - 1 - max((len(f" r{r}") for r in ranks if r is not None), default=0)
            names = shorten_all([p.name[len(prefix) :] or p.name for p in u.params], room)
            for p, shown, rank in zip(u.params, names, ranks, strict=True):
                self._shown[Row("tensor", p.name)] = (shown if rank is None else f"{shown} r{rank}", p.numel)
        self._relabel_rows(list(self._shown))

    def _relabel_rows(self, rows: Iterable[Row]) -> None:
        """Relabel ``rows`` alone, by the names the last full pass shortened (a key's mark costs its rows only)."""
        if self._state is None:
            return
        for row in rows:
            node = self._row_nodes.get(row)
            if node is None or (shown := self._shown.get(row)) is None:
                continue
            parts = self._parts(row, *shown, self._narrow)
            if parts != self._drawn.get(row):  # compared as strings: no label is built for a row that did not change
                self._drawn[row] = parts
                name, on_its_way, tail, style = parts
                label = Text(name, style="bold" if row.kind == "unit" else "")
                label.append(on_its_way, style="bold yellow")
                label.append(tail, style=style)
                self._set_label(node, label)

    def _set_label(self, node: TreeNode[Row], label: Text) -> None:
        """``node.set_label`` without its repaint of every row under the node: a unit's new share or mark changes
        its own line, not its tensors' (Textual's line cache keys each line on every node above it, so the
        repaint would draw a whole block again for one word)."""
        node._label = self.process_label(label)
        node._updates += 1
        if node.line >= 0:
            self.refresh_line(node.line)

    @property
    def rows(self) -> dict[Row, Row | None]:
        """Every row in the tree (expanded or not), with the unit row it sits under (None for units)."""
        return {row: node.parent.data if node.parent is not None else None for row, node in self._row_nodes.items()}

    def move_to(self, row: Row) -> None:
        """Put the cursor on ``row``, expanding its unit if it is a tensor."""
        node = self._row_nodes.get(row)
        if node is None:
            return
        if node.parent is not None and not node.parent.is_root:
            node.parent.expand()
        self.call_after_refresh(self.move_cursor, node)

    def change_sent(self, rows: list[Row]) -> None:
        self.changing.update(rows)
        self._relabel_rows(rows)

    def change_received(self, rows: list[Row]) -> None:
        """The engine has the change for ``rows``; it applies at its next step boundary."""
        self.queued.update(r for r in rows if r in self.changing)
        self._relabel_rows(rows)

    def change_answered(self, rows: list[Row]) -> None:
        """Applied or refused: the rows, the units above them and the tensors below show what the engine says again
        (the rest of the tree follows at the next frame)."""
        self.changing.difference_update(rows)
        self.queued.difference_update(rows)
        self._relabel_rows(self._touched(rows))

    def _touched(self, rows: list[Row]) -> list[Row]:
        """``rows`` with the unit each tensor sits under and the tensors of each unit: what a change to them moves."""
        touched = dict.fromkeys(rows)
        for row in rows:
            node = self._row_nodes.get(row)
            if node is None:
                continue
            if row.kind == "tensor" and node.parent is not None and node.parent.data is not None:
                touched[node.parent.data] = None
            touched.update((c.data, None) for c in node.children if c.data is not None)
        return list(touched)

    def _parts(self, row: Row, shown: str, numel: int, narrow: bool) -> tuple[str, str, str, str]:
        """The name padded to the room the tree leaves its level, then the marks (every row's marks line up), and the
        style of the tail."""
        state = self._state
        assert state is not None
        if row.kind == "unit":
            frac = state.unit_trainable.get(row.name, 1.0)
            stats = state.unit_stats.get(row.name)
            sparsity = stats.sparsity if stats is not None else 0.0
        else:
            frac = 1.0 if state.tensor_trainable.get(row.name, True) else 0.0
            sparsity = state.tensor_sparsity.get(row.name, 0.0)
        style = "green" if frac >= 0.9999 else "bright_black" if frac <= 0.0001 else "yellow"
        width = max(24, self.size.width - 1 if self.size.width else 34)
        tail = self._tail(frac, numel, sparsity, narrow)
        room = max(1, width - INDENT - len(tail) - 1)
        on_its_way = ("…" if row in self.queued else "·") if row in self.changing else " "
        return f"{shown:<{room}}", on_its_way, tail, style

    @staticmethod
    def _tail(frac: float, numel: int, sparsity: float, narrow: bool) -> str:
        """Trainable (● / ○ or train / frozen, a share when partly), parameters, sparsity: fixed widths."""
        if frac >= 0.9999:
            mark = "●" if narrow else "train"
        elif frac <= 0.0001:
            mark = "○" if narrow else "frozen"
        else:
            mark = f"{frac:.0%}"
        return (
            f" {mark:>4} {short_count(numel):>5} {sparsity:>4.0%}"
            if narrow
            else f" {mark:>6} {short_count(numel):>5} {sparsity:>4.0%}"
        )

    # -- keys ---------------------------------------------------------------

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted) -> None:
        """The cursor's row by its full name on the line under the tree (it wraps): rows may show it shortened."""
        row = event.node.data
        self.full_name.update(row.name if row is not None else "")

    def _cursor_row(self) -> Row | None:
        node = self.cursor_node
        return node.data if node is not None else None

    def _unit_names(self) -> list[str]:
        return [u.name for u in self._state.units] if self._state else []

    def action_toggle_trainable(self) -> None:
        row = self._cursor_row()
        if row is None or self._state is None:
            return
        if row.kind == "unit":
            rule = FreezeRule(units=[row.name], trainable=self._state.unit_trainable.get(row.name, 1.0) < 0.9999)
        else:
            rule = FreezeRule(match=row.name, trainable=not self._state.tensor_trainable.get(row.name, True))
        self.post_message(self.ChangeRequested(Change(freeze=[rule]), [row]))

    def action_freeze_to_here(self) -> None:
        """Freeze the cursor's unit and every unit before it (embeddings … cursor)."""
        names = self._unit_names()
        unit = self._cursor_unit()
        if unit is None:
            return
        self._request_units(names[: names.index(unit) + 1], trainable=False)

    def action_unfreeze_after_here(self) -> None:
        """Unfreeze every unit after the cursor's unit (cursor+1 … head)."""
        names = self._unit_names()
        unit = self._cursor_unit()
        if unit is None or names.index(unit) == len(names) - 1:
            return
        self._request_units(names[names.index(unit) + 1 :], trainable=True)

    def _request_units(self, units: list[str], trainable: bool) -> None:
        change = Change(freeze=[FreezeRule(units=units, trainable=trainable)])
        self.post_message(self.ChangeRequested(change, [Row("unit", n) for n in units]))

    def _cursor_unit(self) -> str | None:
        row = self._cursor_row()
        if row is None or self._state is None:
            return None
        return row.name if row.kind == "unit" else self._state.unit_of(row.name)

    def action_expand_row(self) -> None:
        node = self.cursor_node
        if node is not None and node.allow_expand:
            node.toggle()

    def action_collapse_row(self) -> None:
        node = self.cursor_node
        if node is None:
            return
        if node.is_expanded and node.allow_expand:
            node.collapse()
        elif node.parent is not None and not node.parent.is_root:
            self.move_cursor(node.parent)
            node.parent.collapse()

    def on_resize(self) -> None:
        self.relabel()


def short_count(n: int) -> str:
    """A count in at most five columns: 980.9k, 147k, 23.1M."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}" if value < 99.95 else f"{value:.0f}{unit}"
    return str(n)


def _common_prefix(names: list[str]) -> str:
    """The dotted prefix shared by a unit's tensors (shown once, on the unit row)."""
    if len(names) < 2:
        return names[0].rsplit(".", 1)[0] + "." if names and "." in names[0] else ""
    parts = [n.split(".") for n in names]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common) + "." if common else ""
