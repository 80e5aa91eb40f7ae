"""Leaderboard specs: YAML -> a frozen ``LeaderboardSpec`` holding one ``RobustSpec`` per
defense, validated once before Ray starts.

Equal budget by construction: every defense's robust spec is built from the *same* population,
holdout seeds, budget, ACC budget, top_k and search seed; only the defense and its space differ.
Each search carries one reference row, ``default`` (no knob changed: the defense's own defaults,
plus the spec's ``base``), so the default row is confirmed on the same holdout members by the
same code as the tuned one. Errors name the field (``SPEC [defense]: field`` where the field is
checked per defense), as for robust specs.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from d3tune.errors import did_you_mean
from d3tune.specs.draws_file import ImportedDraws
from d3tune.specs.fields import expect, integer
from d3tune.specs.robust_spec import RobustSpec, check_top_keys, robust_plan
from d3tune.yamlio import load_yaml

LEADERBOARD_KEYS = {"name", "population", "holdout_seeds", "holdout_attacks", "defenses",
                    "spaces", "base", "budget", "compute_budget_s",
                    "max_acc_drop", "min_asr", "top_k", "search_seed", "resources",
                    "max_concurrent", "max_failures", "storage", "experiment", "cache_dir",
                    "start_with_default", "split_test", "replicates", "compare",
                    "member_batch", "imported_draws"}
# passed to every defense's robust spec unchanged
SHARED_KEYS = ("population", "holdout_seeds", "holdout_attacks", "base", "budget",
               "compute_budget_s", "max_acc_drop", "min_asr", "top_k", "search_seed",
               "resources", "max_concurrent", "max_failures", "cache_dir", "split_test",
               "replicates", "member_batch")
DEFAULT_REFERENCE = "default"  # the holdout label of the default row is "ref-default"
STORAGE = "d3tune_results/leaderboard"
EXPERIMENT = "d3tune-leaderboard"


@dataclass(frozen=True)
class LeaderboardSpec:
    """A validated leaderboard: its defenses, one robust spec per defense (same population,
    holdout, budget and protocol; only the defense and its space differ), where its state and
    MLflow runs go, and the pairs P(A > B) is reported for."""
    name: str
    source: str
    defenses: tuple[str, ...]
    searches: tuple[RobustSpec, ...]  # one per defense, same order
    storage: str = STORAGE
    experiment: str = EXPERIMENT
    # (A, B): P(A > B) over paired draws is reported for each (replicated leaderboards)
    pairs: tuple[tuple[str, str], ...] = ()
    # defenses whose replicated draws come from an earlier run (``imported_draws``), checked
    # against this spec's protocol; their models and one member are checked when this one runs
    imported: tuple[ImportedDraws, ...] = ()

    @property
    def replicates(self) -> int:
        """How many replicated searches each defense gets (the same for all)."""
        return self.searches[0].replicates

    def with_replicates(self, replicates: int) -> "LeaderboardSpec":
        """The leaderboard with K replicates per defense; raises UsageError as a spec's
        ``replicates`` would."""
        return replace(self, searches=tuple(s.with_replicates(replicates)
                                            for s in self.searches),
                       imported=tuple(i.with_spec(i.spec.with_replicates(replicates))
                                      for i in self.imported))

    @property
    def budget(self) -> int:
        """Settings per defense (equal for all, by construction)."""
        return self.searches[0].budget

    @property
    def state_dir(self) -> Path:
        """The leaderboard's own state (run map, population, table) beside the searches'."""
        return Path(self.storage).expanduser().resolve() / f"{self.name}.leaderboard"

    def search_of(self, defense: str) -> RobustSpec:
        """The robust spec of ``defense`` (one of ``defenses``)."""
        return self.searches[self.defenses.index(defense)]

    def with_budget(self, budget: int) -> "LeaderboardSpec":
        """The leaderboard with ``budget`` settings for every defense; raises UsageError for a
        budget < 1."""
        return replace(self, searches=tuple(s.with_budget(budget) for s in self.searches),
                       imported=tuple(i.with_spec(i.spec.with_budget(budget))
                                      for i in self.imported))

    def check_imports(self) -> None:
        """Each imported defense's file against the protocol this leaderboard runs it under,
        once the command line's overrides are applied; UsageError naming the field."""
        for i in self.imported:
            i.check()

    def with_paths(self, storage: str | None = None, cache_dir: str | None = None,
                   experiment: str | None = None) -> "LeaderboardSpec":
        """Command-line overrides, applied to the leaderboard and to every search alike."""
        changes = {k: v for k, v in (("storage", storage), ("cache_dir", cache_dir),
                                     ("experiment", experiment)) if v}
        searches = tuple(replace(s, **changes) for s in self.searches)
        imported = tuple(i.with_spec(replace(i.spec, **changes)) for i in self.imported)
        return replace(self, searches=searches, imported=imported,
                       **{k: v for k, v in changes.items() if k != "cache_dir"})


def _defenses(data: Mapping[str, Any], source: str) -> tuple[str, ...]:
    from d3tune.defenses import DEFENSES, leaderboard_order

    where = f"{source}: defenses"
    raw = data.get("defenses") if "defenses" in data else list(leaderboard_order(
        [n for n in DEFENSES.names() if DEFENSES[n].space is not None]))
    expect(isinstance(raw, list) and raw, where, f"expected a non-empty list of defense names, "
            f"got {raw!r}")
    known = DEFENSES.names()
    for i, d in enumerate(raw):
        expect(isinstance(d, str) and d in known, f"{where}[{i}]",
                f"unknown defense {d!r}{did_you_mean(str(d), known)}; known: {', '.join(known)}")
    expect(len(set(raw)) == len(raw), where, f"a defense is listed twice: {raw}")
    return tuple(raw)


def _registered_space(defense: str) -> dict[str, Any] | None:
    """The search space the defense registered beside its code (defenses.DefenseEntry)."""
    from d3tune.defenses import DEFENSES

    space = DEFENSES[defense].space
    return None if space is None else {k: v for k, v in space.items()}


def leaderboard_plan(data: Any, source: str,
                     data_dirs: Mapping[str | None, str] | None = None) -> LeaderboardSpec:
    """Validate a leaderboard spec given as plain data; one RobustSpec per defense
    (``data_dirs``: ``--data-dir`` folders, as for ``robust_plan``). Raises UsageError."""
    check_top_keys(data, source, LEADERBOARD_KEYS)
    name = data.get("name", Path(source).stem.split(".")[0])
    expect(isinstance(name, str) and name.replace("-", "").replace("_", "").isalnum(),
            f"{source}: name", f"expected letters, digits, '-' or '_', got {name!r}")
    defenses = _defenses(data, source)
    spaces = data.get("spaces", {})
    expect(isinstance(spaces, Mapping), f"{source}: spaces",
            "expected a mapping of defense name to its space ({defense.field: distribution})")
    imported_names = tuple(data.get("imported_draws") or {}) \
        if isinstance(data.get("imported_draws"), Mapping) else ()
    for d in spaces:
        expect(d in defenses or d in imported_names, f"{source}: spaces.{d}",
                f"not a defense of this leaderboard{did_you_mean(str(d), defenses)}; "
                f"defenses: {', '.join(defenses)}")
    from d3tune.defenses import DEFENSES

    for d in defenses:
        expect(d in spaces or DEFENSES[d].space is not None, f"{source}: spaces.{d}",
                f"defense {d!r} registers no search space; give one here "
                "({defense.<knob>: distribution, ...})")
    for key in ("storage", "experiment"):
        expect(data.get(key) is None or isinstance(data.get(key), str), f"{source}: {key}",
                f"expected a string, got {data.get(key)!r}")
    start = data.get("start_with_default", True)
    expect(isinstance(start, bool), f"{source}: start_with_default",
            f"expected true or false, got {start!r}")
    storage = data.get("storage") or STORAGE
    experiment = data.get("experiment") or EXPERIMENT

    def search(d: str) -> RobustSpec:
        robust = {k: data[k] for k in SHARED_KEYS if k in data}
        robust.update(name=f"{name}-{d}", defense=d, space=spaces.get(d, _registered_space(d)),
                      references=[{"name": DEFAULT_REFERENCE, "setting": {}}],
                      start_with=[DEFAULT_REFERENCE] if start else [],
                      storage=storage, experiment=experiment)
        if isinstance(robust.get("base"), Mapping):
            expect("name" not in (robust["base"].get("defense") or {}),
                    f"{source}: base.defense.name", "the defense comes from `defenses`")
        return robust_plan(robust, f"{source} [{d}]", data_dirs)

    searches = [search(d) for d in defenses]
    budget = integer(data.get("budget", RobustSpec.budget), f"{source}: budget", 1)
    assert all(s.budget == budget for s in searches)  # equal budget, by construction
    imported = _imported(data, defenses, spaces, source, search)
    return LeaderboardSpec(name=name, source=source, defenses=defenses,
                           searches=tuple(searches), storage=storage, experiment=experiment,
                           pairs=_pairs(data, defenses + tuple(i.defense for i in imported),
                                        source),
                           imported=imported)


def _imported(data: Mapping[str, Any], defenses: tuple[str, ...], spaces: Mapping[str, Any],
              source: str, search: Any) -> tuple[ImportedDraws, ...]:
    """``imported_draws: {defense: draws_<defense>.json}``: each file read, with the search
    this spec would run that defense under (``search(defense)``); the two protocols are
    compared by ``LeaderboardSpec.check_imports`` once the command line has had its say."""
    from d3tune.defenses import DEFENSES
    from d3tune.specs import draws_file

    raw = data.get("imported_draws") or {}
    where = f"{source}: imported_draws"
    expect(isinstance(raw, Mapping), where, "expected a mapping of defense name to the "
           "draws_<defense>.json an earlier leaderboard wrote")
    out = []
    for d, path in raw.items():
        at = f"{where}.{d}"
        expect(d in DEFENSES.names(), at, f"unknown defense {d!r}"
               f"{did_you_mean(str(d), DEFENSES.names())}")
        expect(d not in defenses, at, f"{d!r} is also in `defenses`: run it here or import "
               "its draws, not both")
        expect(isinstance(path, str) and path, at, f"expected a file path, got {path!r}")
        expect(d in spaces or DEFENSES[d].space is not None, f"{source}: spaces.{d}",
               f"defense {d!r} registers no search space; give the one its draws ran with")
        out.append(draws_file.load(path, d, search(d), at))
    return tuple(out)


def _pairs(data: Mapping[str, Any], defenses: tuple[str, ...],
           source: str) -> tuple[tuple[str, str], ...]:
    """D3 (else the first defense) against each other defense, then the spec's ``compare``
    pairs: the P(A > B) a replicated leaderboard reports."""
    lead = "d3" if "d3" in defenses else defenses[0]
    pairs = [(lead, d) for d in defenses if d != lead]
    raw = data.get("compare", [])
    where = f"{source}: compare"
    expect(isinstance(raw, list), where, f"expected a list of [A, B] defense pairs, got {raw!r}")
    for i, pair in enumerate(raw):
        expect(isinstance(pair, list) and len(pair) == 2 and pair[0] != pair[1]
                and all(p in defenses for p in pair), f"{where}[{i}]",
                f"expected [A, B], two defenses of this leaderboard ({', '.join(defenses)}), "
                f"got {pair!r}")
        if tuple(pair) not in pairs:
            pairs.append((str(pair[0]), str(pair[1])))
    return tuple(pairs)


def load_leaderboard(path: str | Path,
                     data_dirs: Mapping[str | None, str] | None = None) -> LeaderboardSpec:
    """A leaderboard spec file, validated (``data_dirs`` as for ``robust_plan``)."""
    data = load_yaml(path)
    expect(data is not None, str(path), "empty spec")
    return leaderboard_plan(data, str(path), data_dirs)


__all__ = ["LeaderboardSpec", "leaderboard_plan", "load_leaderboard", "DEFAULT_REFERENCE"]
