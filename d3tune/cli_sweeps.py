"""Sweep-side commands: ``sweep`` (Optuna + ASHA) and ``ablate`` (grids), both on Ray Tune."""
from __future__ import annotations

import argparse


def cmd_sweep(args: argparse.Namespace) -> int:
    from d3tune.spec import load_plan
    from d3tune.sweeps import run_plan

    plan = load_plan(args.spec, "sweep", num_samples=args.num_samples)
    plan = _with_overrides(plan, args)
    run_plan(plan, resume=args.resume, address=args.address)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from d3tune.spec import load_plan
    from d3tune.sweeps import run_plan

    plan = _with_overrides(load_plan(args.spec, "ablation"), args)
    run_plan(plan, resume=args.resume, address=args.address)
    return 0


def _with_overrides(plan, args: argparse.Namespace):
    """--data-dir/--dataset/--storage/--cache-dir apply to every trial of a spec."""
    from dataclasses import replace

    from d3tune.config import flatten, trial_config, unflatten
    from d3tune.errors import UsageError

    base = flatten(plan.base)
    if args.dataset:
        base["data.name"] = args.dataset
    if args.data_dir:
        base["data.data_dir"] = args.data_dir
    try:
        trial_config(unflatten(base))
    except UsageError as exc:
        raise UsageError(f"--dataset/--data-dir: {exc}") from None
    changes = {"base": unflatten(base)}
    if args.storage:
        changes["storage"] = args.storage
    if args.cache_dir:
        changes["cache_dir"] = args.cache_dir
    if args.experiment:
        changes["experiment"] = args.experiment
    return replace(plan, **changes)


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="YAML spec")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of this spec (finished trials are kept)")
    p.add_argument("--address", help="join a running Ray cluster: auto or HOST:PORT")
    p.add_argument("--dataset", help="override the spec's dataset for every trial")
    p.add_argument("--data-dir", help="local folder of a real dataset")
    p.add_argument("--storage", help="Tune storage folder (shared storage on a cluster)")
    p.add_argument("--cache-dir", help="backdoored-model cache folder")
    p.add_argument("--experiment", help="MLflow experiment name")


def add_commands(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="search D3's hyperparameters (Optuna TPE + ASHA on Ray Tune)")
    _shared(sweep)
    sweep.add_argument("--num-samples", type=int, help="number of trials (overrides the spec)")
    sweep.set_defaults(func=cmd_sweep)
    ablate = sub.add_parser("ablate", help="run an ablation grid (axes x attacks x seeds)")
    _shared(ablate)
    ablate.set_defaults(func=cmd_ablate)
