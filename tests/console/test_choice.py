"""``Choice``: one widget where Textual's Select is five, with the keys a Select answers."""

from __future__ import annotations

import pytest
from textual.app import App, ComposeResult

from spu_tui.widgets.choice import Choice, ChoicePicker


class OneChoice(App):
    def __init__(self) -> None:
        super().__init__()
        self.changes: list[str] = []

    def compose(self) -> ComposeResult:
        yield Choice(["none", "lora", "adapter"], "none", id="method")

    def on_choice_changed(self, event: Choice.Changed) -> None:
        self.changes.append(event.value)


async def test_enter_opens_the_options_and_enter_picks_one():
    app = OneChoice()
    async with app.run_test(size=(40, 12)) as pilot:
        choice = app.query_one(Choice)
        choice.focus()
        await pilot.press("enter")
        assert isinstance(app.screen, ChoicePicker) and choice.expanded
        await pilot.press("down", "enter")
        await pilot.pause()
        assert choice.value == "lora" and app.changes == ["lora"] and not choice.expanded
        assert app.focused is choice, "focus comes back to the choice"
        assert "lora" in str(choice.render()) and len(list(app.screen.walk_children())) == 1


async def test_escape_keeps_the_value_and_code_sets_it_as_a_select_would():
    app = OneChoice()
    async with app.run_test(size=(40, 12)) as pilot:
        choice = app.query_one(Choice)
        choice.focus()
        await pilot.press("enter", "down", "escape")
        await pilot.pause()
        assert choice.value == "none" and app.changes == []
        choice.value = "adapter"
        await pilot.pause()
        assert app.changes == ["adapter"]
        with pytest.raises(ValueError, match="'dora' is not one of"):
            choice.value = "dora"


async def test_the_options_open_above_a_choice_at_the_bottom_of_the_screen():
    class AtTheBottom(OneChoice):
        CSS = "Screen { align-vertical: bottom; }"

    app = AtTheBottom()
    async with app.run_test(size=(40, 8)) as pilot:
        choice = app.query_one(Choice)
        choice.focus()
        await pilot.press("enter")
        await pilot.pause()
        listed = app.screen.query_one("OptionList")
        assert listed.region.bottom <= choice.region.y and listed.region.y >= 0
