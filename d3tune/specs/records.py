"""BackdoorBench records as trial fields: the attack, dataset and architecture a record brings,
and the folder its clean data is read from.

Why one place: ``d3tune run --attack-result`` and the records of a robust or leaderboard
population must resolve a record the same way, or a robust default found on records would not
reproduce as a single run. A record says where BackdoorBench read its clean data
(``data_path``, relative to the folder its attack script ran in, e.g. ``./data/cifar10``); when
the user names no folder, d3tune looks for that path beside the record, in the BackdoorBench
checkout the record sits in (``<root>/record/<name>/attack_result.pt``), and in the working
directory, and says which it used.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from d3tune.attacks.imported import NAME as RECORD_ATTACK
from d3tune.errors import UsageError

log = logging.getLogger(__name__)


def recorded_data_candidates(record: Path, data_path: str) -> list[Path]:
    """Where a record's recorded ``data_path`` may be, in the order tried: beside the record,
    in the BackdoorBench checkout holding it (two folders up), in the working directory."""
    if not data_path:
        return []
    recorded = Path(data_path).expanduser()
    if recorded.is_absolute():
        return [recorded]
    folder = record.expanduser().absolute().parent
    out: list[Path] = []
    for root in (folder, folder.parent.parent, Path.cwd()):
        candidate = Path(*(root / recorded).parts)  # keeps '..' (no symlink resolution)
        if candidate not in out:
            out.append(candidate)
    return out


def record_data_dir(record: str | Path, dataset: str, data_path: str, field: str) -> str:
    """The clean-data folder of a record whose user named none: its recorded ``data_path``,
    found as ``recorded_data_candidates`` says (logged), or one line naming every path tried
    and ``field``, the setting that names the folder."""
    tried = recorded_data_candidates(Path(record), data_path)
    for candidate in tried:
        if candidate.is_dir():
            log.warning("%s: no folder given for its %s data; using %s (the record's data_path "
                        "%r)", record, dataset, candidate, data_path)
            return str(candidate)
    where = (f"its recorded data_path {data_path!r} is none of "
             + ", ".join(str(p) for p in tried)) if tried else "it records no data_path"
    raise UsageError(f"{field}: {record} holds a model trained on {dataset}, which d3tune reads "
                     f"from a folder; {where}")


def record_fields(path: str | Path) -> tuple[dict[str, Any], str]:
    """The flat trial fields a record brings (its attack and file, absolute; the d3tune dataset
    and architecture it was trained with) and its recorded ``data_path``. A record of a dataset
    d3tune cannot read is one line naming the file."""
    from d3tune.backdoorbench import read_header

    full = str(Path(path).expanduser().absolute())
    header = read_header(full)
    if header.dataset is None:
        raise UsageError(f"attack.result: {full} was trained on {header.clean_data!r}, for which "
                         "d3tune has no loader")
    return ({"attack.name": RECORD_ATTACK, "attack.result": full, "data.name": header.dataset,
             "model.arch": header.arch}, header.data_path)


__all__ = ["record_fields", "record_data_dir", "recorded_data_candidates", "RECORD_ATTACK"]
