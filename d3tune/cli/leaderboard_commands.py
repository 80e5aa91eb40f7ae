"""``d3tune leaderboard SPEC``: every defense tuned with the same budget, default vs tuned on
the same holdout seeds (search/leaderboard_driver.py)."""
from __future__ import annotations

import argparse


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from d3tune.api import leaderboard
    from d3tune.cli.robust_commands import data_dir_flags

    leaderboard(args.spec, budget=args.budget, resume=args.resume, address=args.address,
                data_dir=data_dir_flags(args.data_dir), replicates=args.replicates,
                storage=args.storage,
                cache_dir=args.cache_dir, experiment=args.experiment)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leaderboard", help="tune every defense with the same budget on the same "
                       "population; default vs tuned, confirmed on holdout seeds")
    p.add_argument("spec", help="YAML leaderboard spec (see search_spaces/leaderboard_digits.yaml)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted leaderboard "
                   "(finished defenses are not re-run; the one it was in continues)")
    p.add_argument("--address", help="join a running Ray cluster: auto or HOST:PORT")
    p.add_argument("--budget", type=int, help="settings per defense (overrides the spec)")
    from d3tune.cli.robust_commands import add_data_dir_flag, add_replicates_flag

    add_data_dir_flag(p)
    add_replicates_flag(p)
    p.add_argument("--storage", help="Tune storage folder (shared storage on a cluster)")
    p.add_argument("--cache-dir", help="backdoored-model cache folder")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.set_defaults(func=cmd_leaderboard)
