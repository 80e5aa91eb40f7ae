"""Defense matrix: every attack x every defense on one dataset, ACC / ASR / RA / DER and seconds.

Why this script: the paper's claim is comparative (D3's DER at least the baselines' on most
attacks; D3 cuts ASR far below FT), so all defenses run through the same ``run_trial`` the
sweeps use, at their default settings, on the same backdoored model and clean subset per seed.

    python benchmarks/defense_matrix.py                              # all x all on digits, seed 0
    python benchmarks/defense_matrix.py --attacks badnets,blended --defenses d3,ft,fp --seeds 3

Attacks and defenses default to everything registered when the script runs. Each attack's model
trains once per seed (a fresh cache in a temporary folder unless ``--cache`` names one). The
defenses are evaluated on the full test sets at their last epoch only (``eval.every`` is set past
the last epoch): per-epoch evaluation does not change any final number, only costs time.
"seconds" is the defense's own time (``TrialResult.seconds["defense"]``), evaluation excluded.
With several seeds each cell is the mean, and ``±`` the standard deviation over seeds.
Prints a Markdown table (one "none" row per attack: the backdoored model before any defense);
``--jsonl`` also appends every trial's row to a file as it finishes.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from d3tune.attacks import ATTACKS, trained_attacks
from d3tune.cache import ModelCache
from d3tune.config import resolve, trial_config
from d3tune.data import load_dataset
from d3tune.defenses import DEFENSES
from d3tune.trial import run_trial

log = logging.getLogger("defense_matrix")

METRICS = ("acc", "asr", "ra", "der", "seconds")
NO_EPOCH_EVAL = 10**9  # eval.every: evaluate only at the last epoch (and at the end)


def names(arg: str | None, registry, default: list[str] | None = None) -> list[str]:
    if not arg:
        return default if default is not None else registry.names()
    return [registry.check(n.strip()) for n in arg.split(",") if n.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attacks", help="comma-separated attack names (default: all that train a model)")
    ap.add_argument("--defenses", help="comma-separated defense names (default: all registered)")
    ap.add_argument("--data", default="digits", help="dataset (default: digits)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default: 1)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache", help="model cache folder to reuse (default: a fresh temporary one)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: torch's choice; 1 is much faster on a "
                         "busy shared CPU, where spinning OpenMP threads starve each other)")
    ap.add_argument("--jsonl", help="append each trial's row to this file as it finishes")
    ap.add_argument("--rows", nargs="+", metavar="JSONL",
                    help="print the table from rows saved with --jsonl (several runs merged, "
                         "e.g. a slow defense run in a process of its own); runs nothing")
    args = ap.parse_args(argv)
    if args.rows:
        print(table_from_rows(args.rows))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    attacks, defenses = names(args.attacks, ATTACKS, trained_attacks()), names(args.defenses, DEFENSES)
    data = load_dataset(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        cache = ModelCache(Path(args.cache) if args.cache else Path(tmp))
        rows = [row for seed in range(args.seeds) for attack in attacks
                for row in rows_for(args, data, seed, attack, defenses, cache)]
    print(markdown(rows, attacks, ["none", *defenses]))


def rows_for(args, data, seed: int, attack: str, defenses: list[str],
             cache: ModelCache) -> list[dict]:
    rows = []
    for defense in defenses:
        cfg = resolve(trial_config({"seed": seed, "device": args.device,
                                    "data": {"name": args.data}, "attack": {"name": attack},
                                    "defense": {"name": defense},
                                    "eval": {"every": NO_EPOCH_EVAL}}))
        t = time.perf_counter()
        result = run_trial(cfg, cache=cache, data=data)
        m = result.metrics
        if not rows:  # the backdoored model, once per (seed, attack)
            rows.append({"seed": seed, "attack": attack, "defense": "none",
                         "acc": m["acc_before"], "asr": m["asr_before"], "ra": m["ra_before"]})
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(rows[0]) + "\n")
        row = {"seed": seed, "attack": attack, "defense": defense, "acc": m["acc_after"],
               "asr": m["asr_after"], "ra": m["ra_after"], "der": m["der"],
               "seconds": result.seconds.get("defense", 0.0),
               "total_seconds": time.perf_counter() - t}
        log.info("seed %d %s/%s: %s", seed, attack, defense,
                 {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
        rows.append(row)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def table_from_rows(paths: list[str]) -> str:
    """The Markdown table of saved rows; a (seed, attack) "none" row saved by two runs counts
    once. Attacks and defenses in the order they first appear."""
    rows, seen = [], set()
    for path in paths:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            key = (row["seed"], row["attack"], row["defense"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    order = lambda k: list(dict.fromkeys(r[k] for r in rows))  # noqa: E731
    defenses = [d for d in order("defense") if d != "none"]
    return markdown(rows, order("attack"), ["none", *defenses])


def cell(values: list[float], spec: str) -> str:
    if not values:
        return ""
    mean = format(statistics.fmean(values), spec)
    return f"{mean} ± {format(statistics.stdev(values), spec)}" if len(values) > 1 else mean


def markdown(rows: list[dict], attacks: list[str], defenses: list[str]) -> str:
    head = "| attack | defense | ACC | ASR | RA | DER | seconds |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for attack in attacks:
        for defense in defenses:
            group = [r for r in rows if r["attack"] == attack and r["defense"] == defense]
            if not group:
                continue
            vals = {k: [r[k] for r in group if k in r] for k in METRICS}
            lines.append(f"| {attack} | {defense} | {cell(vals['acc'], '.3f')} "
                         f"| {cell(vals['asr'], '.3f')} | {cell(vals['ra'], '.3f')} "
                         f"| {cell(vals['der'], '.3f')} | {cell(vals['seconds'], '.0f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
