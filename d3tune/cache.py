"""Content-addressed store of backdoored models.

Training the backdoored model is the expensive step of a trial, and every defense trial on the
same (dataset, attack, architecture, training, seed) needs the same one. Entries are keyed by a
hash of exactly those settings and written once: a file lock makes concurrent trials build a key
once, files are written to a temporary name and renamed, and ``meta.json`` (written last) holds
the SHA-256 of the weights, so a truncated or tampered entry is detected and rebuilt.
Weights are safetensors: loading one never runs code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ENV_VAR = "D3TUNE_CACHE_DIR"


def default_cache_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "d3tune" / "models")


def cache_key(settings: Mapping[str, Any]) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(frozen=True)
class Entry:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


class ModelCache:
    """``get_or_build(key, build)`` returns the stored entry or builds, stores and returns it."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.builds = 0  # how many entries this process built (for tests and benchmarks)

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def load(self, key: str) -> Entry | None:
        """The entry, or None when it is absent, partial, corrupt or tampered with."""
        d = self._dir(key)
        meta_path, weights = d / "meta.json", d / "model.safetensors"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("sha256") != _sha256(weights):
                log.warning("cache entry %s does not match its checksum; rebuilding", key)
                return None
            return Entry(load_file(str(weights)), meta["meta"])
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.warning("cache entry %s is unreadable (%s); rebuilding", key, exc)
            return None

    def checksum(self, key: str) -> str | None:
        """The SHA-256 of the entry's weights as recorded when it was stored, or None when the
        entry is absent or its record unreadable: what identifies the very model a run used."""
        try:
            return str(json.loads((self._dir(key) / "meta.json").read_text())["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store(self, key: str, entry: Entry) -> None:
        d = self._dir(key)
        d.mkdir(parents=True, exist_ok=True)
        weights = d / "model.safetensors"
        tensors = {k: v.detach().cpu().contiguous() for k, v in entry.tensors.items()}
        _atomic_write(weights, lambda p: save_file(tensors, str(p)))
        record = {"sha256": _sha256(weights), "meta": entry.meta}
        _atomic_write(d / "meta.json", lambda p: p.write_text(json.dumps(record, indent=1)))

    def get_or_build(self, key: str, build: Callable[[], Entry]) -> tuple[Entry, bool]:
        """(entry, built_now). Concurrent callers with one key build it once."""
        entry = self.load(key)
        if entry is not None:
            return entry, False
        d = self._dir(key)
        d.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(d) + ".lock"):
            entry = self.load(key)  # another process may have built it while we waited
            if entry is not None:
                return entry, False
            entry = build()
            self.store(key, entry)
            self.builds += 1
            return entry, True
