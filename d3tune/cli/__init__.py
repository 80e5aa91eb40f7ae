"""Command line: ``d3tune run | sweep | ablate | robust | leaderboard | report | defaults | list``.

Every bad input becomes one line on stderr and exit status 2 (``--debug`` shows the traceback).
Configuration is validated here, once, into frozen dataclasses before any work starts.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from d3tune.errors import UsageError

log = logging.getLogger("d3tune")


# ---------------------------------------------------------------------------------------------
# Shared pieces


# `d3tune run` flags that set one trial field each (argparse dest -> dotted field). Every spec
# kind must be able to set these fields too, or refuse them on purpose (tests/test_spec_fields.py).
RUN_FLAG_FIELDS = {"dataset": "data.name", "data_dir": "data.data_dir",
                   "clean_ratio": "data.clean_ratio", "train_size": "data.train_size",
                   "attack": "attack.name", "defense": "defense.name", "arch": "model.arch",
                   "seed": "seed", "epochs": "defense.epochs", "lr": "defense.lr",
                   "device": "device"}


def trial_dict_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """--config file, then the named flags, then --set overrides (last wins), then the record
    of --attack-result (``d3tune.api.trial_fields``)."""
    from d3tune.api import trial_fields

    return trial_fields(config_file=args.config,
                        flags={path: getattr(args, dest) for dest, path in RUN_FLAG_FIELDS.items()},
                        sets=args.set or [], attack_result=getattr(args, "attack_result", None),
                        eval_full=getattr(args, "eval_full", False))


def _setup_logging(verbose: bool) -> None:
    import os

    from rich.logging import RichHandler

    if not verbose:  # mlflow sets its own level (INFO) when imported, after this runs
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    root = logging.getLogger()
    if not root.handlers:  # leave a host application's (or pytest's) handlers alone
        root.addHandler(RichHandler(show_path=False, show_time=False))
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for noisy in ("alembic", "mlflow", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# d3tune run


def cmd_run(args: argparse.Namespace) -> int:
    from d3tune import api

    return api.run(trial_dict_from_args(args), out=args.out, cache_dir=args.cache_dir,
                   use_cache=not args.no_cache, experiment=args.experiment,
                   use_mlflow=not args.no_mlflow, threads=args.threads)


def cmd_list(args: argparse.Namespace) -> int:
    from d3tune import api

    kinds = {"attacks": api.list_attacks, "defenses": api.list_defenses,
             "models": api.list_models, "datasets": api.list_datasets}
    for kind in [args.kind] if args.kind else kinds:
        print(f"{kind}: {', '.join(kinds[kind](args.pattern))}")
    if args.kind == "defenses":  # one line each: the paper, from the registry entry
        for name, citation in api.defense_citations(args.pattern).items():
            print(f"  {name}: {citation or '(no citation registered)'}")
    loaded = api.loaded_plugins()  # a skipped plugin was reported in its warning line
    if loaded and not args.kind:
        print(f"plugins: {', '.join(loaded)}")
    return 0


# ---------------------------------------------------------------------------------------------
# Parser


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1; argparse prints the error as one usage line, exit 2."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _add_trial_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with trial fields (data/attack/model/train/"
                   "defense/eval/seed); flags below override it")
    p.add_argument("--dataset", help="digits (default, embedded), fashion_mnist (Debian's "
                   "dataset-fashion-mnist), synthetic, cifar10, gtsrb, tiny-imagenet")
    p.add_argument("--data-dir", help="local folder of a real dataset (never downloaded)")
    p.add_argument("--train-size", type=int, help="training images kept (a fixed stratified "
                   "subset; default: the dataset profile's)")
    p.add_argument("--attack", help="attack name (see `d3tune list attacks`)")
    p.add_argument("--defense", help="defense name (see `d3tune list defenses`)")
    p.add_argument("--arch", help="architecture (default: the dataset's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--clean-ratio", type=float, help="fraction of training data the defender has")
    p.add_argument("--epochs", type=int, help="defense epochs")
    p.add_argument("--lr", type=float, help="defense learning rate")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--attack-result", metavar="PATH",
                   help="defend a BackdoorBench model: its attack_result.pt (bd_test_dataset/ "
                   "beside it); the clean data comes from --data-dir")
    p.add_argument("--eval-full", action="store_true",
                   help="score every defense epoch on the full test sets (eval.every=1, "
                   "eval.subset=0); by default a trial evaluates a few epochs, as many as keep "
                   "evaluation near 15 %% of its time, on a fixed class-stratified subset (rung "
                   "epochs, the last epoch and the final metrics always on the full sets)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any trial field, e.g. --set defense.eps=0.2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d3tune", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="one trial: poison, train, defend, evaluate, log to MLflow")
    _add_trial_flags(run)
    run.add_argument("--out", default="d3tune_results/runs",
                     help="folder for result.json and the defended weights")
    run.add_argument("--cache-dir", help="backdoored-model cache (default: $D3TUNE_CACHE_DIR "
                     "or ~/.cache/d3tune/models)")
    run.add_argument("--no-cache", action="store_true", help="always train the backdoored model")
    run.add_argument("--experiment", default="d3tune", help="MLflow experiment name")
    run.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    run.add_argument("--threads", type=_positive_int, metavar="N",
                     help="torch CPU threads (default: torch's choice). Results depend on it: "
                     "robust searches, leaderboards, sweeps and ablations run each trial with "
                     "its resources.cpu threads (1 by default); pass the same N to reproduce one")
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="registered attacks, defenses, models, datasets")
    lst.add_argument("kind", nargs="?", choices=["attacks", "defenses", "models", "datasets"])
    lst.add_argument("--pattern", default="*", help="wildcard filter, e.g. 'vit*'")
    lst.set_defaults(func=cmd_list)

    from d3tune.cli import leaderboard_commands as cli_leaderboard
    from d3tune.cli import robust_commands as cli_robust
    from d3tune.cli import sweep_commands as cli_sweeps

    cli_sweeps.add_commands(sub)
    cli_robust.add_commands(sub)
    cli_leaderboard.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with one usage line on bad flags
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"d3tune: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print("d3tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
