"""The one error type users see.

Anything wrong with what a user handed us (a spec field, a path, a name) is a ``UsageError``;
the CLI prints its message as one line and exits 2. Everything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class UsageError(Exception):
    """Bad input from the user: one line naming the field or path and what was expected."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean ...?)' suffix when ``name`` is close to one of ``choices``."""
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> UsageError:
    choices = sorted(choices)
    return UsageError(
        f"unknown {kind} {name!r}{did_you_mean(name, choices)}; choose one of: {', '.join(choices)}"
    )
