"""Worst case over the four attacks, per setting and seed, from the grids' Tune folders.

Why a script: `d3tune report` averages an ablation's cells over seeds; the leaderboard's
question is the worst member of a population, one population per seed. Reads each trial's final
result (``final: true``) from the Tune folders of spec.yaml, spec_fst.yaml and spec_ft.yaml and
writes cells.csv (one row per trial) and by_seed.csv (worst DER and mean ACC drop per setting and
seed).

    python docs/results/fmnist_holdout_seeds/summarize.py [TUNE_FOLDER ...]
"""
from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
NAMES = {  # the zip entries of spec.yaml, told apart by name and learning rate
    ("d3", None): "d3 default", ("d3", 0.03907017570286471): "d3 tuned (run B)",
    ("d3", 0.04032897930596135): "d3 shipped (run A)", ("ft_sam", None): "ft_sam default",
    ("ft_sam", 0.011701414134690256): "ft_sam tuned (run B)", ("fst", None): "fst default",
    ("fst", 0.024481975040542326): "fst tuned (run A)", ("ft", None): "ft default",
    ("ft", 0.024481975040542326): "ft tuned (run A)"}


def final_rows(folder: Path) -> list[dict]:
    rows = []
    for result in sorted(folder.glob("*/result.json")):
        lines = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        last = [r for r in lines if r.get("final")]
        if not last:
            continue
        r, cell = last[-1], last[-1]["config"]["cell"]
        rows.append({"setting": NAMES[(cell["defense.name"], cell.get("defense.lr"))],
                     "attack": cell["attack.name"], "seed": cell["seed"],
                     "acc_before": r["acc_before"], "asr_before": r["asr_before"],
                     "acc": r["acc"], "asr": r["asr"], "der": r["der"],
                     "acc_drop": r["acc_before"] - r["acc"], "seconds": r["time_total_s"],
                     "built_model": bool(r.get("cache_builds"))})
    return rows


def mean_or_none(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 1) if xs else None


def main() -> None:
    folders = [Path(a) for a in sys.argv[1:]] or [
        Path("d3tune_results/ablations/fmnist_holdout_seeds"),
        Path("d3tune_results/ablations/fmnist_holdout_seeds_fst"),
        Path("d3tune_results/ablations/fmnist_holdout_seeds_ft")]
    rows = [r for folder in folders for r in final_rows(folder)]
    with open(HERE / "cells.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: (r["setting"], r["seed"], r["attack"])))
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["setting"], r["seed"])].append(r)
    out = []
    for (setting, seed), members in sorted(groups.items()):
        worst = min(members, key=lambda r: r["der"])
        out.append({"setting": setting, "seed": seed, "members": len(members),
                    "worst_der": round(worst["der"], 3), "worst_attack": worst["attack"],
                    "mean_der": round(sum(r["der"] for r in members) / len(members), 3),
                    "mean_acc_drop_pts": round(100 * sum(r["acc_drop"] for r in members)
                                               / len(members), 1),
                    # seconds of a defense on a cached model (a trial that built its model first
                    # is left out), as a leaderboard's seconds per member
                    "s_per_member": mean_or_none([r["seconds"] for r in members
                                                 if not r["built_model"]])})
    with open(HERE / "by_seed.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)
    for r in out:
        print(r)


if __name__ == "__main__":
    main()
