"""The draws file a finished replicated leaderboard writes per defense
(``draws_<defense>.json``), read and checked against a spec's protocol when a later
leaderboard names it under ``imported_draws``.

Why it is a spec concern: whether an earlier run's draws may stand beside this run's is a
property of the two protocols, decided once when the spec loads (a mismatch is one line naming
``imported_draws.<defense>`` and the differing fields, exit 2). Whether the *models* and the
*code* still agree is checked when the leaderboard runs (``d3tune.search.imported_draws``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from d3tune.errors import UsageError
from d3tune.specs.robust_spec import RobustSpec

FORMAT = 1
KIND = "d3tune.imported_draws"


def draws_file(out: Path, defense: str) -> Path:
    """Where a leaderboard's report folder keeps a defense's draws for later import."""
    return out / f"draws_{defense}.json"



def _no_paths(value: Any) -> Any:
    """``value`` without ``data_dir`` fields: where a dataset sits is not part of the
    protocol (the models' cache keys carry the data's content fingerprint instead)."""
    if isinstance(value, Mapping):
        return {k: _no_paths(v) for k, v in value.items()
                if not str(k).endswith("data_dir")}
    return value



def protocol(spec: RobustSpec) -> dict[str, Any]:
    """Everything a replicated search's figures depend on besides code and models, as plain
    JSON data: two specs with equal protocols run the same procedure."""
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
           "replicates": spec.replicates, "member_batch": spec.member_batch}
    return json.loads(json.dumps(raw, sort_keys=True, default=str))



def protocol_differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """The protocol fields that differ, by name."""
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))



@dataclass(frozen=True)
class ImportedDraws:
    """A defense's replicated draws from an earlier run, validated against this spec's
    protocol (``load``); its models and one member evaluation are checked when this run has
    them (``check_models``, ``spot_check``)."""
    defense: str
    path: str
    summaries: list[dict[str, Any]]  # one per replicate (replicate_driver.summarize)
    models: dict[str, dict[str, str]]  # member id -> cache key and weights SHA-256
    spot: list[dict[str, Any]] = field(default_factory=list)  # one holdout row per replicate
    provenance: dict[str, Any] = field(default_factory=dict)
    spec: RobustSpec | None = None  # this spec's search of the defense (same protocol)
    protocol: dict[str, Any] = field(default_factory=dict)  # the file's

    def under(self, spec: RobustSpec, where: str) -> "ImportedDraws":
        """The import again, for this leaderboard's search changed on the command line
        (``--budget``, ``--replicates``): refused (UsageError naming ``where``) when the
        file's protocol is not the changed one."""
        _check_protocol(spec, self.protocol, self.path, where)
        return replace(self, spec=spec)



def load(path: str | Path, defense: str, spec: RobustSpec, where: str) -> ImportedDraws:
    """The file at ``path``, checked to hold ``defense``'s replicated draws under the protocol
    ``spec`` (this leaderboard's search of that defense) runs; UsageError naming ``where``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{where}: no such file {str(p)!r} (a draws_<defense>.json from an "
                         "earlier leaderboard's report folder)")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{where}: {p} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise UsageError(f"{where}: {p} is not a d3tune draws file")
    if data.get("format") != FORMAT:
        raise UsageError(f"{where}: {p} has format {data.get('format')!r}; this d3tune reads "
                         f"format {FORMAT}")
    if data.get("defense") != defense:
        raise UsageError(f"{where}: {p} holds {data.get('defense')!r}'s draws, not {defense!r}")
    _check_protocol(spec, data.get("protocol") or {}, str(p), where)
    summaries = data.get("summaries")
    if not (isinstance(summaries, list) and len(summaries) == spec.replicates
            and all(isinstance(s, dict) and "draws" in s for s in summaries)):
        raise UsageError(f"{where}: {p} does not hold {spec.replicates} replicates' summaries")
    return ImportedDraws(defense, str(p), summaries, dict(data.get("models") or {}),
                         list(data.get("spot") or []), dict(data.get("provenance") or {}), spec,
                         dict(data["protocol"]))


def _check_protocol(spec: RobustSpec, theirs: Mapping[str, Any], path: str, where: str) -> None:
    differ = protocol_differences(protocol(spec), theirs)
    if differ:
        raise UsageError(f"{where}: {path} ran under another protocol ({', '.join(differ)} "
                         "differ from this spec's); its draws would not pair with this run's")



__all__ = ["ImportedDraws", "load", "protocol", "protocol_differences", "draws_file", "FORMAT",
           "KIND"]
