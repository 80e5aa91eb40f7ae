"""The run ledger on disk (``search/ledger.py``): a snapshot plus an append-only journal. What
resume trusts must read back exactly as it was changed, survive a kill mid-write or
mid-compaction, and cost one appended line per change whatever the ledger's size."""
from __future__ import annotations

import json
import pickle

import pytest

from d3tune.search.ledger import JOURNAL, SNAPSHOT, Ledger, apply, empty, read


def _ledger(tmp_path) -> Ledger:
    ledger = Ledger(tmp_path)
    ledger.load()
    return ledger


def test_changes_read_back_from_the_journal_as_made(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.commit(("put", "parent", None, "p1"))
    ledger.commit(("set", "children", "t1", "r1"), ("set", "keys", "cell:{}", "t1"))
    ledger.commit(("set", "closing", "t1", "FINISHED"), ("add", "done", None, "t1"))
    ledger.commit(("drop", "closing", "t1", None), ("add", "done", None, "t1"))
    on_disk = read(tmp_path)
    assert on_disk == ledger.state
    assert on_disk["parent"] == "p1" and on_disk["done"] == ["t1"] and on_disk["closing"] == {}
    assert len((tmp_path / JOURNAL).read_text().split()) == 4  # one line per change set
    assert json.loads((tmp_path / SNAPSHOT).read_text()) == empty()  # snapshot untouched


def test_one_change_costs_one_short_line_however_large_the_ledger(tmp_path):
    ledger = _ledger(tmp_path)
    for i in range(2000):
        ledger.commit(("set", "results", f"t{i}", {"der": 0.5, "epoch": 4}))
    size = (tmp_path / JOURNAL).stat().st_size
    ledger.commit(("set", "steps", "t1999", 4))
    assert (tmp_path / JOURNAL).stat().st_size - size < 60  # not the whole ledger again


def test_a_torn_line_is_a_change_never_made_and_later_changes_still_read(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.commit(("set", "children", "t1", "r1"))
    with open(tmp_path / JOURNAL, "a") as f:
        f.write('\n[["set","children","t2","r')  # a kill (or a full disk) inside this write
    assert read(tmp_path)["children"] == {"t1": "r1"}
    again = _ledger(tmp_path)  # the next driver goes on writing
    again.commit(("set", "steps", "t1", 1))
    state = read(tmp_path)
    assert state["children"] == {"t1": "r1"} and state["steps"] == {"t1": 1}


def test_a_write_that_fails_changes_nothing_in_memory(tmp_path, monkeypatch):
    ledger = _ledger(tmp_path)

    def full_disk(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("d3tune.search.ledger.os.write", full_disk)
    with pytest.raises(OSError):
        ledger.commit(("set", "children", "t1", "r1"))
    assert ledger.state["children"] == {}


def test_a_read_beside_a_compaction_sees_every_change(tmp_path, monkeypatch):
    ledger = _ledger(tmp_path)
    ledger.commit(("set", "children", "t1", "r1"))
    import d3tune.search.ledger as module

    real = module._read_once
    calls = []

    def racing(snapshot, journal):  # the driver compacts between the reader's two reads
        calls.append(1)
        out = real(snapshot, journal)
        if len(calls) == 1:
            ledger.compact()
            return out[0], ""  # the old snapshot, and a journal already deleted
        return out

    monkeypatch.setattr(module, "_read_once", racing)
    assert read(tmp_path)["children"] == {"t1": "r1"} and len(calls) == 2


def test_a_kill_between_snapshot_and_journal_truncation_replays_to_the_same_ledger(tmp_path):
    ledger = _ledger(tmp_path)
    ops = [("set", "children", "t1", "r1"), ("add", "done", None, "t1"),
           ("set", "closing", "t1", "FINISHED"), ("drop", "closing", "t1", None),
           ("put", "parent_params", None, ["a", "b"])]
    for op in ops:
        ledger.commit(op)
    journal = (tmp_path / JOURNAL).read_bytes()
    ledger.compact()
    (tmp_path / JOURNAL).write_bytes(journal)  # the unlink never happened
    assert read(tmp_path) == ledger.state


def test_loading_folds_the_journal_into_the_snapshot(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.commit(("set", "children", "t1", "r1"))
    again = _ledger(tmp_path)
    assert again.state["children"] == {"t1": "r1"}
    assert not (tmp_path / JOURNAL).exists()
    assert json.loads((tmp_path / SNAPSHOT).read_text())["children"] == {"t1": "r1"}


def test_a_ledger_written_whole_by_an_older_d3tune_still_reads(tmp_path):
    old = {**empty(), "parent": "p", "children": {"t1": "r1"}, "done": ["t1"]}
    (tmp_path / SNAPSHOT).write_text(json.dumps(old))
    assert _ledger(tmp_path).state == old


def test_a_pickled_copy_reads_the_disk_again_before_it_may_write(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.commit(("set", "children", "t1", "r1"))
    copy = pickle.loads(pickle.dumps(ledger))
    assert copy.state == empty() and not copy.loaded
    copy.compact()  # a copy never loaded must not overwrite the disk with nothing
    assert read(tmp_path)["children"] == {"t1": "r1"}
    with pytest.raises(RuntimeError, match="before it was read"):
        copy.commit(("set", "children", "t2", "r2"))


def test_an_unknown_operation_is_refused():
    with pytest.raises(ValueError, match="unknown ledger operation"):
        apply(empty(), ("merge", "children", "t1", "r1"))
