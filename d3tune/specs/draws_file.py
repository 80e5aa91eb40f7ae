"""The draws file a finished replicated leaderboard writes per defense
(``draws_<defense>.json``), read when a later leaderboard names it under ``imported_draws`` and
checked against the protocol that leaderboard runs.

Why it is a spec concern: whether an earlier run's draws may stand beside this run's is a
property of the two protocols, decided before anything runs (a mismatch is one line naming
``imported_draws.<defense>`` and the differing fields, exit 2). The file is read when the spec
loads; its protocol is compared once the command line's overrides (``--budget``,
``--replicates``) are applied (``LeaderboardSpec.check_imports``). Whether the *models* and
the *code* still agree is checked when the leaderboard runs (``d3tune.search.imported_draws``).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from d3tune.errors import UsageError
from d3tune.specs.robust_spec import RobustSpec

FORMAT = 1
KIND = "d3tune.imported_draws"
# fields that say where a file sits, not what it holds: a dataset folder, a BackdoorBench
# record (the models' cache keys carry the data's and the record's content digests instead)
PATH_FIELDS = ("data_dir", "result")


def draws_file(out: Path, defense: str) -> Path:
    """Where a leaderboard's report folder keeps a defense's draws for later import."""
    return out / f"draws_{defense}.json"


def _no_paths(value: Any) -> Any:
    """``value`` without fields that only locate files (``PATH_FIELDS``)."""
    if isinstance(value, Mapping):
        return {k: _no_paths(v) for k, v in value.items()
                if not any(str(k) == f or str(k).endswith(f".{f}") for f in PATH_FIELDS)}
    return value


def protocol(spec: RobustSpec) -> dict[str, Any]:
    """Everything a replicated search's figures depend on besides code and models, as plain
    JSON data: two specs with equal protocols run the same procedure. ``max_concurrent`` is
    in it because TPE proposes each setting from the settings finished by then."""
    raw = {"defense": spec.defense, "base": _no_paths(spec.base),
           "members": [[m.id, _no_paths(m.fields)] for m in spec.members],
           "holdout": [[m.id, _no_paths(m.fields)] for m in spec.holdout],
           "space": [asdict(d) for d in spec.space], "budget": spec.budget,
           "max_acc_drop": spec.max_acc_drop, "min_asr": spec.min_asr, "top_k": spec.top_k,
           "tradeoff_budgets": list(spec.tradeoff_budgets),
           "references": [asdict(r) for r in spec.references],
           "start_points": [list(p) for p in spec.start_points],
           "search_seed": spec.search_seed, "time_budget_s": spec.time_budget_s,
           "compute_budget_s": spec.compute_budget_s,
           "threads": max(1, int(spec.resources.cpu)), "split_test": spec.split_test,
           "replicates": spec.replicates, "member_batch": spec.member_batch,
           "max_concurrent": spec.max_concurrent}
    return json.loads(json.dumps(raw, sort_keys=True, default=str))


def protocol_differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """The protocol fields that differ, by name."""
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))


@dataclass(frozen=True)
class ImportedDraws:
    """A defense's replicated draws from an earlier run (``load``), with this leaderboard's
    search of that defense (``spec``) to check them against (``check``); its models and one
    member evaluation are checked when this run has them (search.imported_draws)."""
    defense: str
    path: str
    sha256: str  # of the file: a resumed leaderboard re-takes an import whose file changed
    summaries: list[dict[str, Any]]  # one per replicate (replicate_driver.summarize)
    models: dict[str, dict[str, Any]]  # member id -> cache key and weights SHA-256 (or None)
    protocol: dict[str, Any]  # the file's
    spec: RobustSpec  # this leaderboard's search of the defense
    where: str  # the spec field, for messages
    spot: list[dict[str, Any]] = field(default_factory=list)  # one holdout row per replicate
    provenance: dict[str, Any] = field(default_factory=dict)

    def with_spec(self, spec: RobustSpec) -> "ImportedDraws":
        """The import for this leaderboard's search changed on the command line."""
        return replace(self, spec=spec)

    def check(self, where: str | None = None) -> None:
        """UsageError naming the field unless the file ran under this search's protocol:
        called once the command line's overrides are applied."""
        where = where or self.where
        if self.spec.replicates < 2:
            raise UsageError(f"{where}: draws pair only in a replicated leaderboard "
                             "(replicates > 1)")
        differ = protocol_differences(protocol(self.spec), self.protocol)
        if differ:
            raise UsageError(f"{where}: {self.path} ran under another protocol "
                             f"({', '.join(differ)} differ from this spec's); its draws would "
                             "not pair with this run's")
        if len(self.summaries) != self.spec.replicates:
            raise UsageError(f"{where}: {self.path} holds {len(self.summaries)} replicates' "
                             f"summaries, not {self.spec.replicates}")


def load(path: str | Path, defense: str, spec: RobustSpec, where: str) -> ImportedDraws:
    """The file at ``path``: a readable draws file of ``defense`` (UsageError naming ``where``
    otherwise). Its protocol is compared by ``ImportedDraws.check``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{where}: no such file {str(p)!r} (a draws_<defense>.json from an "
                         "earlier leaderboard's report folder)")
    try:
        raw = p.read_bytes()
        data = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{where}: {p} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise UsageError(f"{where}: {p} is not a d3tune draws file")
    if data.get("format") != FORMAT:
        raise UsageError(f"{where}: {p} has format {data.get('format')!r}; this d3tune reads "
                         f"format {FORMAT}")
    if data.get("defense") != defense:
        raise UsageError(f"{where}: {p} holds {data.get('defense')!r}'s draws, not {defense!r}")
    summaries = data.get("summaries")
    if not (isinstance(summaries, list) and summaries
            and all(isinstance(s, dict) and "draws" in s for s in summaries)
            and isinstance(data.get("protocol"), dict)
            and isinstance(data.get("models"), dict)):
        raise UsageError(f"{where}: {p} lacks its summaries, protocol or models")
    return ImportedDraws(defense, str(p), hashlib.sha256(raw).hexdigest(), summaries,
                         dict(data["models"]), dict(data["protocol"]), spec, where,
                         list(data.get("spot") or []), dict(data.get("provenance") or {}))


__all__ = ["ImportedDraws", "load", "protocol", "protocol_differences", "draws_file", "FORMAT",
           "KIND", "PATH_FIELDS"]
