"""Sweep-side commands: ``sweep`` (Optuna + ASHA) and ``ablate`` (grids), both on Ray Tune."""
from __future__ import annotations

import argparse


def cmd_sweep(args: argparse.Namespace) -> int:
    from d3tune.api import sweep

    sweep(args.spec, num_samples=args.num_samples, resume=args.resume, address=args.address,
          **_overrides(args))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from d3tune.api import ablate

    ablate(args.spec, resume=args.resume, address=args.address, **_overrides(args))
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, str | None]:
    """--dataset/--data-dir/--storage/--cache-dir/--experiment: every trial of a spec."""
    return {"dataset": args.dataset, "data_dir": args.data_dir, "storage": args.storage,
            "cache_dir": args.cache_dir, "experiment": args.experiment}


def cmd_report(args: argparse.Namespace) -> int:
    from d3tune.api import report

    out = report(args.run, args.out)
    print(f"report written to {out / 'report.md'} and {out / 'report.html'} (self-contained; "
          "also logged to the parent run under report/: open report.html in the MLflow UI's "
          "Artifacts tab)")
    return 0


def cmd_defaults(args: argparse.Namespace) -> int:
    from d3tune.api import defaults

    res, importance = defaults(args.runs, max_acc_drop=args.max_acc_drop, out=args.out)
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
    report.add_argument("run", help="MLflow parent run id, an experiment name or a spec name (latest parent)")
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
