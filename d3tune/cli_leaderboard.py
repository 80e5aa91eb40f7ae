"""``d3tune leaderboard SPEC``: every defense tuned with the same budget, default vs tuned on
the same holdout seeds (leaderboard.py)."""
from __future__ import annotations

import argparse


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from d3tune.cli_robust import check_members
    from d3tune.cli_sweeps import path_overrides
    from d3tune.errors import UsageError
    from d3tune.leaderboard import run_leaderboard
    from d3tune.leaderboard_spec import load_leaderboard

    spec = load_leaderboard(args.spec)
    if args.budget is not None:
        if args.resume:
            raise UsageError("--budget: a resumed leaderboard keeps the budget it started with")
        spec = spec.with_budget(args.budget)
    paths = path_overrides(args)
    spec = spec.with_paths(storage=paths.get("storage"), experiment=paths.get("experiment"),
                           cache_dir=paths.get("cache_dir"))
    check_members(spec.searches[0])  # the population is the same for every defense
    run_leaderboard(spec, resume=args.resume, address=args.address)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leaderboard", help="tune every defense with the same budget on the same "
                       "population; default vs tuned, confirmed on holdout seeds")
    p.add_argument("spec", help="YAML leaderboard spec (see search_spaces/leaderboard_digits.yaml)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted leaderboard "
                   "(finished defenses are not re-run; the one it was in continues)")
    p.add_argument("--address", help="join a running Ray cluster: auto or HOST:PORT")
    p.add_argument("--budget", type=int, help="settings per defense (overrides the spec)")
    p.add_argument("--storage", help="Tune storage folder (shared storage on a cluster)")
    p.add_argument("--cache-dir", help="backdoored-model cache folder")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.set_defaults(func=cmd_leaderboard)
