"""``d3tune robust SPEC``: robust defaults by search, confirmed on holdout seeds
(search/robust_driver.py); ``d3tune adopt RUN``: make a finished search's confirmed setting the
defaults (search/adoption.py)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

def add_data_dir_flag(p: argparse.ArgumentParser) -> None:
    """``--data-dir``, as ``d3tune run`` has it, for a population's datasets."""
    p.add_argument("--data-dir", action="append", metavar="[DATASET=]DIR",
                   help="local folder of the population's dataset (CIFAR-10, GTSRB, "
                   "Tiny-ImageNet; never downloaded), overriding the spec's; with several "
                   "datasets, DATASET=DIR once each. On a cluster it must exist on every node")


def add_replicates_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicates", type=int, metavar="K",
                   help="K whole searches, each with its own sampler and population seeds "
                   "(seeds + 1000 r), confirmed on the same holdout seeds: the answer comes "
                   "with a 95 %% interval (overrides the spec's replicates)")


def data_dir_flags(values: Sequence[str] | None) -> dict[str, str] | str | None:
    """``--data-dir DIR`` (the population's one dataset) or ``--data-dir NAME=DIR`` (repeated),
    as the API's ``data_dir``."""
    from d3tune.api import list_datasets
    from d3tune.errors import UsageError

    datasets = list_datasets()
    if not values:
        return None
    named: dict[str, str] = {}
    plain = []
    for value in values:
        name, sep, folder = value.partition("=")
        if sep and name in datasets:
            if name in named:
                raise UsageError(f"--data-dir {value}: {name} is given twice")
            named[name] = folder
        else:
            plain.append(value)
    if plain and (named or len(plain) > 1):
        raise UsageError(f"--data-dir {plain[0]}: with several --data-dir, name each one's "
                         f"dataset (DATASET=DIR; datasets: {', '.join(datasets)})")
    return plain[0] if plain else named


def cmd_robust(args: argparse.Namespace) -> int:
    from d3tune import api

    paths = {"storage": args.storage, "cache_dir": args.cache_dir, "experiment": args.experiment}
    common = {"budget": args.budget, "time_budget_s": args.time_budget_s, "resume": args.resume,
              "address": args.address, "data_dir": data_dir_flags(args.data_dir), **paths}
    if args.leave_one_attack_out:
        return _leave_one_attack_out(args, common)
    api.robust(args.spec, out=args.out, replicates=args.replicates, **common)
    return 0


def _leave_one_attack_out(args: argparse.Namespace, common: dict) -> int:
    from rich.console import Console
    from rich.table import Table

    from d3tune.api import leave_one_attack_out
    from d3tune.errors import UsageError

    if args.out:
        raise UsageError("--out: with --leave-one-attack-out each search writes "
                         "d3tune_results/robust/NAME-without-ATTACK.yaml")
    if args.replicates is not None:
        raise UsageError("--replicates: --leave-one-attack-out runs one search per attack "
                         "family; replicated leave-one-attack-out searches are not supported")
    table = leave_one_attack_out(args.spec, **common)
    shown = Table(title="leave-one-attack-out: each attack confirmed by a search that never "
                  "saw it (holdout seeds)")
    for col in table.columns:
        shown.add_column(col.replace("_", " "))
    for _, row in table.iterrows():
        shown.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    Console(width=None).print(shown)
    return 0


def cmd_adopt(args: argparse.Namespace) -> int:
    from d3tune.api import adopt

    entry = adopt(args.run, dataset=args.dataset, file=args.file, force=args.force)
    print(f"adopted for {entry.dataset}: {entry.defense} "
          + ", ".join(f"{k} {v}" for k, v in entry.knobs.items()))
    proc = entry.provenance.get("procedure")
    if proc:  # a replicated search: the procedure's interval beside the setting's own figure
        low, high = proc["interval"]
        print(f"replicate {entry.provenance['adopted_replicate']}'s setting: holdout worst-case "
              f"DER {entry.provenance.get('holdout_worst_der', float('nan')):.3f}; the procedure "
              f"(expected over {proc['draws']:.0f} draws): {proc['expected_worst_der']:.3f} "
              f"[{low:.3f}, {high:.3f}] ({proc['interval_kind']})")
    print(f"wrote {entry.path}; `d3tune run --dataset {entry.dataset} --defense "
          f"{entry.defense}` now uses these knobs wherever a config leaves them unset")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("robust", help="search defense settings for the best worst-case DER over "
                       "a population (ACC budget as a constraint), confirmed on holdout seeds")
    p.add_argument("spec", help="YAML robust spec (see search_spaces/robust_d3_digits.yaml)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search (finished settings are not re-run)")
    p.add_argument("--address", help="join a running Ray cluster: auto or HOST:PORT")
    p.add_argument("--budget", type=int, help="number of settings to try (overrides the spec)")
    p.add_argument("--time-budget-s", type=float, help="stop searching after this many seconds "
                   "(settings still running are cut; the confirmation follows)")
    p.add_argument("--leave-one-attack-out", action="store_true",
                   help="one search per attack family of the population: search on the others, "
                   "confirm on it (holdout seeds); a summary table at the end")
    add_data_dir_flag(p)
    add_replicates_flag(p)
    p.add_argument("--storage", help="Tune storage folder (shared storage on a cluster)")
    p.add_argument("--cache-dir", help="backdoored-model cache folder")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.add_argument("--out", help="YAML of the chosen defaults (default "
                   "d3tune_results/robust/NAME.yaml); use it with `d3tune run --config`")
    p.set_defaults(func=cmd_robust)
    a = sub.add_parser("adopt", help="make a finished robust search's confirmed setting the "
                       "defaults of its defense on its dataset (every knob, with provenance)")
    a.add_argument("run", help="the robust search's MLflow parent run id (printed by "
                   "`d3tune robust`; MLFLOW_TRACKING_URI or ./mlflow.db)")
    a.add_argument("--dataset", help="the dataset whose defaults to set (needed when the "
                   "search's population spans several)")
    a.add_argument("--file", help="defaults file to write (default: $D3TUNE_DEFAULTS_DIR or "
                   "d3tune/defaults/, then <dataset>.yaml)")
    a.add_argument("--force", action="store_true", help="adopt from a replicated search even "
                   "when its replicates' holdout worst cases spread by more than the spec's "
                   "adopt_tolerance")
    a.set_defaults(func=cmd_adopt)
