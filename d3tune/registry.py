"""Name -> object registries that can be listed, filtered and fail with close matches.

Why not a plain dict: an unknown name must fail at the edge with the close matches
(``UsageError``), and users want ``list("vit*")`` as timm offers for models.

Every lookup (``reg[name]``, ``name in reg``, iteration, ``reg.names()``) first runs the lookup
hook, which ``d3tune.plugins`` sets to its loader when the package is imported: the first lookup
in a process loads the installed plugins (``d3tune/plugins.py`` says why lookups are the
trigger). The hook keeps this module at the bottom of the import graph: the registries' packages
import it, and the plugin loader, which needs those packages, sits above them.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from d3tune.errors import unknown_name

T = TypeVar("T")

_LOOKUP_HOOK: list[Callable[[], Any]] = []  # at most one: d3tune.plugins.ensure_plugins


def set_lookup_hook(hook: Callable[[], Any]) -> None:
    """Run ``hook`` before every registry lookup (the plugin loader; cheap once it has run)."""
    _LOOKUP_HOOK[:] = [hook]


def _before_lookup() -> None:
    for hook in _LOOKUP_HOOK:
        hook()


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return add

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def __getitem__(self, name: str) -> T:
        _before_lookup()
        try:
            return self._items[name]
        except KeyError:
            raise unknown_name(self.kind, name, self._items) from None

    def __contains__(self, name: object) -> bool:
        _before_lookup()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        _before_lookup()
        return iter(sorted(self._items))

    def names(self, pattern: str = "*") -> list[str]:
        _before_lookup()
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def check(self, name: str) -> str:
        """Validate a name without building anything; returns it."""
        self[name]
        return name


def import_builtins(package: str, path: Iterable[str]) -> list[str]:
    """Import every public module of a method package (``_``-prefixed ones are private); each
    registers its method on import. Why discovery and not an import list: a new built-in
    attack, defense, model or dataset is then one file, with nothing else to edit. Returns the
    module names, in name order (registries list names sorted, so the order is not visible)."""
    import importlib
    import pkgutil

    names = sorted(info.name for info in pkgutil.iter_modules(list(path))
                   if not info.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names

