"""Adopted defaults: a defense's every knob, per dataset, as confirmed by a robust search.

Why: "finding robust defaults" should end in the defaults ``d3tune run`` uses, not in a YAML
file beside them. ``d3tune adopt RUN`` (``d3tune/search/adoption.py``) reads a finished robust
search from MLflow (its chosen setting, confirmed on the holdout) and writes every knob of that
defense, resolved for the dataset, into ``<dataset>.yaml`` with where it came from (spec, run,
search and holdout figures, date). ``trial_config`` then fills each defense knob a config
leaves unset from there, before the dataset profile and the defense's built-in values;
``defaults: builtin`` in a config (the robust search's ``paper`` reference uses it) skips the
adopted layer.

Where the files live: ``$D3TUNE_DEFAULTS_DIR`` first (a user's or a cluster's own), then
``d3tune/defaults/`` in the package (what d3tune ships). One file per dataset, one entry per
defense::

    d3:
      knobs: {epochs: 41, batch_size: 16, lr: 0.041, ..., eps: 0.13, init: near}
      provenance: {robust_run: ..., spec: ..., holdout_worst_der: 0.896, adopted_on: ...}
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d3tune.errors import UsageError

PACKAGE_DIR = Path(__file__).parent / "defaults"
ENV = "D3TUNE_DEFAULTS_DIR"
SHIPPED_ENV = "D3TUNE_SHIPPED_DEFAULTS"


@dataclass(frozen=True)
class Adopted:
    dataset: str
    defense: str
    knobs: dict[str, Any]  # the defense section's fields, name excluded
    provenance: dict[str, Any]
    path: Path

    def describe(self) -> str:
        """One line for the console: which settings a run used and why they are the defaults."""
        p = self.provenance
        figures = ", ".join(f"{label} {p[k]:.3f}" for k, label in (
            ("search_worst_der", "search worst DER"), ("holdout_worst_der", "holdout worst DER"))
            if isinstance(p.get(k), (int, float)))
        drop = p.get("holdout_mean_acc_drop")
        if isinstance(drop, (int, float)):
            figures += f", holdout ACC drop {drop * 100:.1f} points"
        proc = p.get("procedure")
        if isinstance(proc, dict) and isinstance(proc.get("expected_worst_der"), (int, float)):
            low, high = proc.get("interval") or (float("nan"), float("nan"))
            figures += (f"; {len(p.get('replicates') or [])} replicates: expected holdout worst "
                        f"DER {proc['expected_worst_der']:.3f} [{low:.3f}, {high:.3f}]")
        return (f"{self.defense} defaults adopted for {self.dataset} from robust run "
                f"{p.get('robust_run', '?')} ({p.get('spec', '?')}; {figures}; "
                f"{p.get('adopted_on', '?')}) in {self.path}")


def folders() -> list[Path]:
    """Where adopted defaults are read: ``$D3TUNE_DEFAULTS_DIR``, then the package's own unless
    ``$D3TUNE_SHIPPED_DEFAULTS`` is 0 (the test suite sets it, so tests of the mechanism do not
    depend on what d3tune ships; ``defaults: builtin`` does the same for one config)."""
    extra = os.environ.get(ENV)
    shipped = os.environ.get(SHIPPED_ENV, "1") != "0"
    return ([Path(extra).expanduser()] if extra else []) + ([PACKAGE_DIR] if shipped else [])


def read(path: Path) -> dict[str, Any]:
    """A defaults file as {defense: {knobs, provenance}}, its shape checked (one line naming
    the file and field when it is off)."""
    from d3tune.yamlio import load_yaml

    data = load_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise UsageError(f"{path}: expected a mapping of defense name to {{knobs, provenance}}")
    for defense, entry in data.items():
        if not (isinstance(entry, Mapping) and isinstance(entry.get("knobs"), Mapping)
                and set(entry) <= {"knobs", "provenance"}):
            raise UsageError(f"{path}: {defense}: expected {{knobs: {{...}}, provenance: {{...}}}}")
    return dict(data)


def lookup(dataset: str, defense: str) -> Adopted | None:
    """The adopted defaults of ``defense`` on ``dataset``, from the first folder that has them."""
    for folder in folders():
        path = folder / f"{dataset}.yaml"
        if path.is_file():
            entry = read(path).get(defense)
            if entry is not None:
                return Adopted(dataset, defense, dict(entry["knobs"]),
                               dict(entry.get("provenance") or {}), path)
    return None


def write(path: Path, dataset: str, defense: str, knobs: Mapping[str, Any],
          provenance: Mapping[str, Any]) -> Adopted:
    """Add or replace one defense's entry (other defenses in the file are kept); atomic."""
    from d3tune.yamlio import dump_yaml

    data = read(path) if path.is_file() else {}
    data[defense] = {"knobs": dict(knobs), "provenance": dict(provenance)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    dump_yaml(data, tmp)
    tmp.replace(path)
    return Adopted(dataset, defense, dict(knobs), dict(provenance), path)


def describe_for(dataset: str, defense: str, mode: str) -> str:
    """What a run's defense settings rest on, in one line."""
    if mode == "builtin":
        return f"{defense} defaults: built-in + {dataset} profile (adopted skipped)"
    adopted = lookup(dataset, defense)
    if adopted is None:
        return f"{defense} defaults: built-in + {dataset} profile (none adopted)"
    return adopted.describe()
