"""Plugins: third-party attacks, defenses, models and datasets, through the entry-point group
``d3tune.plugins`` (docs/plugins.md), without forking d3tune.

The first lookup in any registry (``reg[name]``, ``name in reg``, ``reg.names()``) loads every
plugin, once per process. Lookups are the trigger, not imports, because a Ray Tune trial runs in
a worker process that imports d3tune afresh: it finds the same plugins the moment its trial
config is validated. A plugin that fails (import error, raising register function, a name taken
twice) is rolled back, reported in one warning line naming it, and skipped: it never takes
``d3tune list`` down.

Importing ``d3tune`` installs ``ensure_plugins`` as the registries' lookup hook
(``registry.set_lookup_hook``); the four registries are imported only when plugins load, so this
module stays light.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from d3tune.registry import Registry

PLUGIN_GROUP = "d3tune.plugins"
log = logging.getLogger("d3tune.plugins")


@dataclass
class PluginState:
    """What this process loaded: names of the plugins that registered, and (name, why) of those
    skipped. ``started`` flips before loading, so a plugin's own lookups do not recurse into
    discovery; other threads wait on ``lock`` until loading is over."""

    started: bool = False
    done: bool = False
    loaded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)


PLUGINS = PluginState()  # one per process, like the registries it fills


def ensure_plugins() -> PluginState:
    """Load the installed plugins unless this process already did (cheap after the first call)."""
    if PLUGINS.done:
        return PLUGINS
    with PLUGINS.lock:
        if PLUGINS.started:  # done, or this thread is inside a plugin's registration
            return PLUGINS
        PLUGINS.started = True
        try:
            from importlib.metadata import entry_points

            try:
                found = list(entry_points(group=PLUGIN_GROUP))
            except Exception as exc:  # unreadable package metadata: run without plugins
                log.warning("plugins not loaded: reading entry points failed (%s)", exc)
                found = []
            load_plugins(found, PLUGINS)
        finally:
            PLUGINS.done = True
    return PLUGINS


def builtin_registries() -> tuple[Registry[Any], ...]:
    """The four registries, with their built-in entries registered (importing does that), so a
    plugin that reuses a built-in name is the one refused."""
    from d3tune.attacks import ATTACKS
    from d3tune.data import DATASETS
    from d3tune.defenses import DEFENSES
    from d3tune.models import MODELS

    return ATTACKS, DEFENSES, MODELS, DATASETS


def load_plugins(entry_points: Iterable[Any], state: PluginState) -> PluginState:
    """Run each entry point: one naming a module registers by importing it (decorators); one
    naming a callable is called with no arguments. A failing plugin's registrations are undone,
    and it is reported in one warning line and skipped."""
    registries = builtin_registries()
    for ep in sorted(entry_points, key=lambda e: e.name):
        label = f"{ep.name!r} ({ep.value})"
        before = [dict(r._items) for r in registries]
        try:
            obj = ep.load()
            if callable(obj):
                obj()
            elif not hasattr(obj, "__file__") and not hasattr(obj, "__path__"):
                raise TypeError(f"{type(obj).__name__} is neither a module nor a callable")
        except Exception as exc:  # a third party's bug must not take d3tune down
            for reg, items in zip(registries, before):
                reg._items = items
            why = " ".join(f"{type(exc).__name__}: {exc}".split())
            why = why if len(why) <= 160 else why[:157] + "..."
            state.skipped.append((ep.name, why))
            log.warning("plugin %s skipped: %s", label, why)
            continue
        state.loaded.append(ep.name)
        added = [f"{r.kind} {n}" for r, items in zip(registries, before) for n in r._items
                 if n not in items]
        log.debug("plugin %s registered %s", label, ", ".join(added) or "nothing")
    return state
