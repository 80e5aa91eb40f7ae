"""Tune's overhead and the backdoored-model cache's saving, measured side by side in one run.

The same N D3 trials (one attack, N learning rates) three ways:
  1. a plain Python loop, no cache: every trial trains its own backdoored model;
  2. a plain Python loop with the cache: the first trial trains it, the rest load it;
  3. through Ray Tune (d3tune's engine, one trial at a time, MLflow logging on), with the cache.
Prints the wall times, Tune's overhead as a share of the Tune sweep's time ((3 - 2) / 3), with
and without Ray's start-up, and the cache's saving ((1 - 2) / 1).

    python benchmarks/sweep_overhead.py --trials 4
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--defense-epochs", type=int, default=20)
    ap.add_argument("--attack-epochs", type=int, default=30)
    args = ap.parse_args()

    import ray
    import torch

    from d3tune.cache import ModelCache
    from d3tune.config import flatten, resolve, trial_config, unflatten
    from d3tune.spec import RunPlan, SchedulerSpec, ResourceSpec
    from d3tune.sweeps import run_plan
    from d3tune.trial import run_trial

    torch.set_num_threads(os.cpu_count() or 1)
    lrs = [0.005 * (i + 1) for i in range(args.trials)]
    base = {"data": {"name": "digits"}, "attack": {"name": "badnets"},
            "train": {"epochs": args.attack_epochs},
            "defense": {"name": "d3", "epochs": args.defense_epochs}, "eval": {"subset": 200}}
    cfgs = [resolve(trial_config(unflatten({**flatten(base), "defense.lr": lr}))) for lr in lrs]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        for cfg in cfgs:
            run_trial(cfg)
        no_cache = time.perf_counter() - t0

        cache = ModelCache(tmp / "cache-loop")
        t0 = time.perf_counter()
        for cfg in cfgs:
            run_trial(cfg, cache=cache)
        with_cache = time.perf_counter() - t0

        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        plan = RunPlan(kind="ablation", name="overhead", source="(benchmark)", base=base,
                       cells=tuple({"defense.lr": lr} for lr in lrs),
                       scheduler=SchedulerSpec(name="none"),
                       resources=ResourceSpec(cpu=float(os.cpu_count() or 1)), max_concurrent=1,
                       storage=str(tmp / "tune"), experiment="overhead",
                       cache_dir=str(tmp / "cache-tune"))
        t0 = time.perf_counter()
        ray.init(include_dashboard=False, logging_level="WARNING")
        ray_start = time.perf_counter() - t0
        t1 = time.perf_counter()
        run_plan(plan)
        tune_sweep = time.perf_counter() - t1
        ray.shutdown()
        tune_total = ray_start + tune_sweep

    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPU cores, load average {load[0]:.2f} {load[1]:.2f}")
    print(f"{args.trials} D3 trials ({args.defense_epochs} epochs each), attack training "
          f"{args.attack_epochs} epochs")
    print("| way | wall seconds |\n|---|---|")
    print(f"| plain loop, no cache | {no_cache:.1f} |")
    print(f"| plain loop, cache | {with_cache:.1f} |")
    print(f"| Ray Tune + MLflow, cache (Ray start {ray_start:.1f} s) | {tune_total:.1f} |")
    print(f"tune overhead: {(tune_sweep - with_cache) / tune_sweep:.1%} of the sweep "
          f"({(tune_total - with_cache) / tune_total:.1%} with Ray's start-up)")
    print(f"cache saving: {(no_cache - with_cache) / no_cache:.1%} of the loop's time "
          f"({no_cache / with_cache:.2f}x faster)")


if __name__ == "__main__":
    main()
