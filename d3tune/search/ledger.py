"""The run ledger on disk: a snapshot plus an append-only journal of its changes.

Why a journal: the ledger changes about five times per trial (child run made, epochs logged,
trial ended, MLflow told). Rewriting the whole file at each change made the driver's cost per
trial grow with the number of trials already run: at 2,000 trials the file was 1.2 MB and took
16 ms to encode, five times per trial (benchmarks/README.md, sweep_scale). One appended line per
change costs the same at any size; the snapshot is rewritten only where a run starts and ends.

Crash safety is what the atomic rewrite gave before:
- one change set is one line, and it is made in memory only once the whole line is written;
  a line torn by a kill or a full disk does not parse, and ``read`` drops it (that change was
  never made). Each line starts with a newline, so a line written after a torn one stands
  alone;
- every operation is idempotent, so a journal replayed over a snapshot that already holds it
  (a kill between compaction's two steps) gives the same ledger.

The callback holding a ``Ledger`` is pickled by Tune with its run config, so no file handle is
kept open between changes.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from d3tune.runstate import write_json

log = logging.getLogger(__name__)

SNAPSHOT = "mlflow_state.json"
JOURNAL = "mlflow_state.jsonl"

# One change: ("put", field, None, value): state[field] = value;
# ("set", section, key, value): state[section][key] = value;
# ("drop", section, key, None): del state[section][key] (if there);
# ("add", section, None, value): append value to the list state[section] unless it holds it.
Op = tuple[str, str, Any, Any]


def empty() -> dict[str, Any]:
    """A ledger with nothing recorded yet."""
    return {"parent": None, "children": {}, "steps": {}, "done": [], "failed": [],
            "results": {}, "keys": {}, "closing": {}, "ended_ms": {}}


def apply(state: dict[str, Any], op: Op) -> None:
    """Make one change to ``state`` in memory."""
    kind, field, key, value = op
    if kind == "put":
        state[field] = value
    elif kind == "set":
        state.setdefault(field, {})[key] = value
    elif kind == "drop":
        state.get(field, {}).pop(key, None)
    elif kind == "add":
        items = state.setdefault(field, [])
        if value not in items:
            items.append(value)
    else:
        raise ValueError(f"unknown ledger operation {kind!r}")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _read_once(snapshot: Path, journal: Path) -> tuple[dict[str, Any], str]:
    state = empty()
    try:
        state.update(json.loads(snapshot.read_text()))
    except FileNotFoundError:
        pass
    try:
        text = journal.read_text()
    except FileNotFoundError:
        text = ""
    return state, text


def read(state_dir: Path) -> dict[str, Any]:
    """The ledger in ``state_dir``: the snapshot with the journal's changes made on top; empty
    when neither was written. A line that does not parse (torn by a kill or a full disk) is a
    change never made, and is dropped. Safe beside a running driver: a read that overlapped a
    compaction (the snapshot replaced, the journal deleted) is taken again."""
    snapshot, journal = state_dir / SNAPSHOT, state_dir / JOURNAL
    for _ in range(10):
        before = _identity(snapshot)
        state, text = _read_once(snapshot, journal)
        if _identity(snapshot) == before:
            break
    torn = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            ops = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        for op in ops:
            apply(state, tuple(op))
    if torn:
        log.warning("ledger %s: dropped %d torn line(s), changes never made", journal, torn)
    return state


class Ledger:
    """One run's ledger: ``state`` in memory, each change appended to the journal as made."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.state: dict[str, Any] = empty()
        self.loaded = False  # compact() writes only a ledger read from disk first

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the callback with its run config: a copy must read the disk again.
        return {"state_dir": self.state_dir, "state": empty(), "loaded": False}

    def load(self) -> dict[str, Any]:
        """Read the ledger from disk and fold the journal into a new snapshot."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state = read(self.state_dir)
        self.loaded = True
        self.compact()
        return self.state

    def commit(self, *ops: Op) -> None:
        """Make ``ops`` in memory and on disk, as one change set."""
        if not self.loaded:
            raise RuntimeError("ledger changed before it was read from disk")
        data = ("\n" + json.dumps([list(op) for op in ops], separators=(",", ":"))).encode()
        fd = os.open(self.state_dir / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while data:  # a regular file takes it in one write, short of a full disk
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        for op in ops:  # in memory only once it is on disk: a failed write changed nothing
            apply(self.state, op)

    def compact(self) -> None:
        """The whole ledger as a new snapshot (atomic), then an empty journal; nothing for a
        ledger never loaded (it would overwrite the disk's with an empty one)."""
        if not self.loaded:
            return
        write_json(self.state_dir / SNAPSHOT, self.state)
        (self.state_dir / JOURNAL).unlink(missing_ok=True)
