"""The backdoored-model cache: one build per key, corrupt entries rebuilt, concurrent builders."""
from __future__ import annotations

import multiprocessing as mp
import time

import torch

from d3tune.cache import Entry, ModelCache, cache_key


def _entry(v: float = 1.0) -> Entry:
    return Entry({"w": torch.full((3, 3), v)}, {"note": "x"})


def test_key_depends_on_settings_only():
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})


def test_store_load_and_rebuild_truncated_or_tampered(tmp_path):
    cache = ModelCache(tmp_path)
    entry, built = cache.get_or_build("k1", _entry)
    assert built and cache.builds == 1
    again, built = cache.get_or_build("k1", lambda: _entry(2.0))
    assert not built and torch.equal(again.tensors["w"], entry.tensors["w"])

    weights = tmp_path / "k1"[:2] / "k1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated
    rebuilt, built = cache.get_or_build("k1", lambda: _entry(3.0))
    assert built and rebuilt.tensors["w"][0, 0] == 3.0

    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # tampered, same length
    weights.write_bytes(bytes(data))
    assert cache.load("k1") is None
    (weights.parent / "meta.json").write_text("{not json")
    assert cache.load("k1") is None


def _slow_builder(root: str, out: "mp.Queue") -> None:
    cache = ModelCache(root)

    def build() -> Entry:
        time.sleep(1.0)
        return _entry(5.0)

    _, built = cache.get_or_build("shared", build)
    out.put(built)


def test_two_processes_build_one_key_once(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_slow_builder, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = sorted(q.get(timeout=5) for _ in procs)
    assert results == [False, True]


def test_changed_data_never_hits_a_stale_model(tmp_path, tiny_digits):
    """Same config, different data (a smaller synthetic size, another copy of a folder): the
    cache key follows the data's content, so the second trial trains its own model; the same
    data again is a hit."""
    from d3tune.config import resolve, trial_config
    from d3tune.data import Dataset
    from d3tune.trial import run_trial

    cfg = resolve(trial_config({"train": {"epochs": 1}, "defense": {"name": "ft", "epochs": 1},
                                "device": "cpu"}))
    d = tiny_digits
    smaller = Dataset(d.name, d.x_train[:300], d.y_train[:300], d.x_test, d.y_test,
                      d.num_classes, d.mean, d.std, d.hflip)
    changed = Dataset(d.name, d.x_train.flip(-1), d.y_train, d.x_test, d.y_test,
                      d.num_classes, d.mean, d.std, d.hflip)
    cache = ModelCache(tmp_path)
    keys = []
    for data, hit in ((d, False), (smaller, False), (changed, False), (d, True)):
        res = run_trial(cfg, cache=cache, data=data)
        assert res.cache_hit is hit
        keys.append(res.cache_key)
    assert len(set(keys)) == 3 and keys[0] == keys[3] and cache.builds == 3
