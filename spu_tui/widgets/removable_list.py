"""A list of what the engine has in force (rules, scheduled entries), any one of which the user may ask to remove."""

from __future__ import annotations

from textual.binding import Binding
from textual.message import Message
from textual.widgets import Label, ListItem, ListView

from spu_tui.widgets.line import Line


class RemovableItem(ListItem):
    """One entry that can be removed (the line saying the list is empty is a plain ``ListItem``); a long one wraps
    rather than losing its end (a trigger's ``✓ fired at step 8``)."""

    DEFAULT_CSS = "RemovableItem { height: auto; } RemovableItem > Line { width: 1fr; }"

    def __init__(self, text: str) -> None:
        super().__init__(Line(text))

    def say(self, text: str) -> None:
        self.query_one(Line).say(text)


class RemovableList(ListView):
    """Lines in the engine's order; ``delete`` or ``x`` asks to remove the highlighted one, ``empty`` says there are
    none."""

    BINDINGS = [Binding("delete,x", "remove", "remove")]

    class RemoveRequested(Message):
        def __init__(self, removable_list: RemovableList, index: int) -> None:
            super().__init__()
            self.removable_list = removable_list
            self.index = index

        @property
        def control(self) -> RemovableList:
            return self.removable_list

    def __init__(self, empty: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.empty = empty
        self.lines: list[str] | None = None  # as last shown (None: not yet)

    def show(self, lines: list[str]) -> None:
        """List ``lines``, keeping the highlight where it was as far as they reach.  Entries rewrite their text in
        place and only the difference in count is mounted or removed: a new entry or an edited one costs one layout,
        a rewrite that keeps every height none."""
        if lines == self.lines:
            return
        self.lines = lines
        if not lines:
            self.clear()
            self.append(ListItem(Label(self.empty)))
            return
        items = list(self.query_children(RemovableItem))
        if not items:
            self.clear()  # the line saying the list is empty
        for item, line in zip(items, lines):
            item.say(line)
        for item in items[len(lines) :]:
            item.remove()
        if len(lines) > len(items):
            self.extend(RemovableItem(line) for line in lines[len(items) :])
        if len(lines) != len(items):
            self.call_after_refresh(setattr, self, "index", min(self.index or 0, len(lines) - 1))

    def action_remove(self) -> None:
        if self.index is not None and isinstance(self.highlighted_child, RemovableItem):
            self.post_message(self.RemoveRequested(self, self.index))
