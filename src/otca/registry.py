"""A named registry: the one mechanism behind every extension point (credit schemes, rewards, policies).

A duplicate name raises; an unknown name is a one-line error that lists the known ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """Objects by name. ``providers`` are modules that register more entries when imported; they are imported
    on the first look-up, so heavy optional modules load only when something asks for a name."""

    def __init__(self, kind: str, providers: tuple[str, ...] = ()):
        self.kind = kind
        self.providers = providers
        self._items: dict[str, T] = {}
        self._loaded = not providers

    def _load_providers(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for mod in self.providers:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:  # a provider that exists but is broken must fail loudly
                    raise

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` adds the object under ``name``."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        self._load_providers()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise UnknownNameError(f"unknown {self.kind} '{name}': known are {known}") from None

    def names(self) -> list[str]:
        self._load_providers()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_providers()
        return name in self._items
