"""Leave-one-attack-out robust searches: for each attack family of a population, search on the
others and confirm on that one (``holdout_attacks``), on the holdout seeds.

Why: a defender does not know the attack they face. A robust search confirmed on the threat
models it searched on (other seeds) says how well the chosen setting generalises over seeds; the
leave-one-attack-out loop says how well the *procedure* generalises to an attack it never saw,
once per attack, which is the figure a defender facing an unknown attack needs. An attack
family is an attack name: ``blended`` and ``{name: blended, alpha: 0.1}`` are left out together
(a variant of the held-out attack in the search would leak it).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from d3tune.specs.fields import expect
from d3tune.specs.robust_spec import RobustSpec, robust_plan
from d3tune.yamlio import load_yaml

log = logging.getLogger(__name__)

SUMMARY_FILE = "leave_one_attack_out.csv"


def _family(entry: Any) -> str:
    return str(entry["name"] if isinstance(entry, Mapping) else entry)


def leave_one_attack_out(data: Mapping[str, Any], source: str,
                         data_dirs: Mapping[str | None, str] | None = None
                         ) -> list[tuple[str, RobustSpec]]:
    """(held-out family, its robust spec) per attack family of ``population.attacks``, in the
    population's order. Each spec searches on the other families (records, datasets, archs and
    clean ratios unchanged) and confirms on the held-out one on ``holdout_seeds``; its name is
    ``NAME-without-FAMILY`` so every search keeps its own folders, MLflow run and resume.
    ``data_dirs``: ``--data-dir`` folders, as for ``robust_plan``."""
    robust_plan(data, source, data_dirs)  # the spec as given is valid first (errors name its fields)
    expect("holdout_attacks" not in data, f"{source}: holdout_attacks",
            "leave-one-attack-out chooses the held-out attacks itself: remove holdout_attacks")
    attacks = list(data["population"].get("attacks") or [])
    families = list(dict.fromkeys(_family(a) for a in attacks))
    expect(len(families) >= 2, f"{source}: population.attacks",
            f"leave-one-attack-out needs at least two attack families, got {families}")
    out = []
    for family in families:
        split = copy.deepcopy(dict(data))
        split["population"] = {**split["population"],
                               "attacks": [a for a in attacks if _family(a) != family]}
        split["holdout_attacks"] = [copy.deepcopy(a) for a in attacks if _family(a) == family]
        split["name"] = f"{data['name']}-without-{family}"
        out.append((family, robust_plan(split, f"{source} (without {family})", data_dirs)))
    return out


def load_leave_one_attack_out(path: str | Path,
                              data_dirs: Mapping[str | None, str] | None = None
                              ) -> list[tuple[str, RobustSpec]]:
    """One robust spec per held-out attack family of the spec file at ``path``."""
    data = load_yaml(path)
    expect(data is not None, str(path), "empty spec")
    return leave_one_attack_out(data, str(path), data_dirs)


def summary_row(family: str, outcome: Any) -> dict[str, Any]:
    """One line per held-out family: the chosen setting's search and held-out figures, and each
    reference's held-out worst case beside it (is the tuned setting better than the default on
    an attack neither saw?)."""
    row: dict[str, Any] = {"held_out": family, "search": outcome.spec.name}
    chosen = outcome.chosen
    if chosen is not None:
        row.update({"chosen": chosen["label"],
                    "setting": ", ".join(f"{k.removeprefix('defense.')}={v}"
                                         for k, v in sorted(chosen["shown"].items())),
                    "search_worst_der": chosen["search_worst_der"],
                    "held_out_worst_der": chosen["holdout_worst_der"],
                    "held_out_mean_der": chosen["holdout_mean_der"],
                    "held_out_acc_drop": chosen["holdout_mean_acc_drop"]})
    hold = outcome.holdout
    if hold is not None and not hold.empty:
        for _, r in hold[hold["kind"] == "reference"].iterrows():
            row[f"{r['label']}_worst_der"] = r["holdout_worst_der"]
    return row


def run_leave_one_attack_out(specs: list[tuple[str, RobustSpec]], *, resume: bool = False,
                             address: str | None = None, out_dir: str | Path | None = None,
                             search: Any = None) -> pd.DataFrame:
    """Run the searches in turn (each resumable on its own: a finished one is read back, not
    re-run) and write the summary table beside them. ``search`` is ``robust.robust_search``
    (a parameter so tests can count calls)."""
    from d3tune.search.robust_driver import robust_search

    search = search or robust_search
    rows = []
    for family, spec in specs:
        state = spec.paths.state_dir
        again = resume and state.exists()
        log.info("leave-one-attack-out: %s held out (%s)", family,
                 "resuming" if again else "new search")
        outcome = search(spec, resume=again, address=address,
                         out=Path(out_dir or "d3tune_results/robust") / f"{spec.name}.yaml")
        rows.append(summary_row(family, outcome))
    table = pd.DataFrame(rows)
    first = specs[0][1]
    where = Path(out_dir) if out_dir else Path(first.storage)
    where.mkdir(parents=True, exist_ok=True)
    name = first.name.rsplit("-without-", 1)[0]
    table.to_csv(where / f"{name}.{SUMMARY_FILE}", index=False)
    return table


def with_paths(specs: list[tuple[str, RobustSpec]], **changes: Any
               ) -> list[tuple[str, RobustSpec]]:
    """The leave-one-attack-out specs with the same path changes (storage, cache, experiment)
    applied to each."""
    return [(f, replace(s, **changes)) for f, s in specs]
