"""Attributes an object forwards to its components, so a composed object keeps one owner for each piece of state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class _Forward:
    """An attribute that lives in one of the owner's components: read and written there."""

    def __init__(self, component: str, name: str) -> None:
        self.component, self.name = component, name

    def __get__(self, engine: Any, owner: type | None = None) -> Any:
        return self if engine is None else getattr(getattr(engine, self.component), self.name)

    def __set__(self, engine: Any, value: Any) -> None:
        setattr(getattr(engine, self.component), self.name, value)


def forwards(**names: str) -> Callable[[type], type]:
    """The attributes a class forwards, by component (space-separated names): for the engine, the surface its
    commands, the server, tools and tests use, so each piece of state keeps one owner, its component."""

    def install(cls: type) -> type:
        for component, listed in names.items():
            for name in listed.split():
                setattr(cls, name, _Forward(component, name))
        return cls

    return install
