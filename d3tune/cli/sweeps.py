"""Sweep-side commands: ``sweep`` (Optuna + ASHA) and ``ablate`` (grids), both on Ray Tune."""
from __future__ import annotations

import argparse


def cmd_sweep(args: argparse.Namespace) -> int:
    from d3tune.search.sweeps import run_plan
    from d3tune.specs.inputs import check_inputs
    from d3tune.specs.sweep import load_plan

    plan = load_plan(args.spec, "sweep", num_samples=args.num_samples)
    plan = _with_overrides(plan, args)
    check_inputs(plan)
    run_plan(plan, resume=args.resume, address=args.address)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from d3tune.search.sweeps import run_plan
    from d3tune.specs.inputs import check_inputs
    from d3tune.specs.sweep import load_plan

    plan = _with_overrides(load_plan(args.spec, "ablation"), args)
    check_inputs(plan)
    run_plan(plan, resume=args.resume, address=args.address)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from d3tune.reports.sweep import make_report

    out = make_report(args.run, args.out)
    print(f"report written to {out / 'report.md'} and {out / 'report.html'} (self-contained; "
          "also logged to the parent run under report/: open report.html in the MLflow UI's "
          "Artifacts tab)")
    return 0


def cmd_defaults(args: argparse.Namespace) -> int:
    from d3tune.reports.sweep import find_defaults

    res, importance = find_defaults(args.runs, args.max_acc_drop, args.out)
    b = res.best
    print(f"robust default ({res.admissible} of {res.considered} settings keep mean ACC drop "
          f"<= {args.max_acc_drop:.3f}):")
    print(f"  {b.setting}")
    print(f"  worst-case DER {b.worst_der:.4f}, mean DER {b.mean_der:.4f}, "
          f"mean ACC drop {b.mean_acc_drop:.4f}, over {b.n} trials")
    if res.runner_up is not None:
        r = res.runner_up
        print(f"runner-up: {r.setting}")
        print(f"  worst-case DER {r.worst_der:.4f} (margin {res.margin:+.4f}), "
              f"mean ACC drop {r.mean_acc_drop:.4f}")
    for run, imp in importance.items():
        print(f"Optuna importance ({run}): " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()))
    print(f"wrote {args.out}: use it with `d3tune run --config {args.out}` or as a spec's base")
    return 0


def _with_overrides(plan, args: argparse.Namespace):
    """--data-dir/--dataset/--storage/--cache-dir apply to every trial of a spec."""
    from dataclasses import replace

    from d3tune.config import flatten, trial_config, unflatten
    from d3tune.errors import UsageError
    from d3tune.specs.sweep import absolute

    base = flatten(plan.base)
    if args.dataset:
        base["data.name"] = args.dataset
    if args.data_dir:
        base["data.data_dir"] = absolute(args.data_dir)
    try:
        trial_config(unflatten(base))
    except UsageError as exc:
        raise UsageError(f"--dataset/--data-dir: {exc}") from None
    return replace(plan, base=unflatten(base), **path_overrides(args))


def path_overrides(args: argparse.Namespace) -> dict[str, str]:
    from d3tune.specs.inputs import path_changes

    return path_changes(args.storage, args.cache_dir, args.experiment)


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
    report = sub.add_parser("report", help="tables and plots of a sweep or ablation from MLflow")
    report.add_argument("run", help="MLflow parent run id, or an experiment name (latest parent)")
    report.add_argument("--out", help="output folder (default d3tune_results/reports/NAME)")
    report.set_defaults(func=cmd_report)
    defaults = sub.add_parser("defaults", help="robust defaults: best worst-case DER across "
                              "attacks, datasets, architectures and seeds")
    defaults.add_argument("runs", nargs="+", help="MLflow parent run ids or experiment names")
    defaults.add_argument("--max-acc-drop", type=float, default=0.02,
                          help="largest mean ACC drop allowed (fraction, default 0.02)")
    defaults.add_argument("--out", default="d3tune_results/robust_defaults.yaml",
                          help="YAML file of the chosen setting (trial fields)")
    defaults.set_defaults(func=cmd_defaults)
