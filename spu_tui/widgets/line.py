"""A line of text that a key or an engine answer rewrites (a status, a what-if, a listed rule).

``Static.update`` lays the whole screen out again, because new text may change the widget's height; with every
panel shown that is ~300 widgets for a word like "queued".  ``Line.say`` asks for a layout only when the new text
needs another height at the line's width, and does nothing when nothing changed.
"""

from __future__ import annotations

from rich.text import Text
from textual.visual import visualize
from textual.widgets import Static


class Line(Static):
    """Text whose rewrites keep the screen's layout when they keep the line's height."""

    def __init__(self, text: str | Text = "", **kwargs) -> None:
        super().__init__(text, **kwargs)
        self.said: str | Text = text

    def say(self, text: str | Text, classes: str | None = None) -> None:
        """Show ``text`` (and set the CSS ``classes``, if given)."""
        if classes is not None and set(classes.split()) != set(self.classes):
            self.set_classes(classes)
        if text == self.said:
            return
        self.said = text
        self.update(text, layout=self._height_of(text) != self.content_size.height)

    def _height_of(self, text: str | Text) -> int | None:
        """Rows ``text`` takes at the line's laid-out width (None before the first layout)."""
        width = self.content_size.width
        if not width:
            return None
        return visualize(self, text, markup=self._render_markup).get_height(self.styles, width)
