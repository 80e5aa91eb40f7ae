"""Ray Tune's overhead and the backdoored-model cache's saving, measured side by side in one run.

The same N D3 trials (one attack, N defense learning rates) three ways, each from a cold cache:
  loop       a plain Python loop calling ``run_trial`` with a fresh cache (one model build);
  tune       d3tune's engine on Ray Tune (one trial at a time, all cores per trial, MLflow
             logging to SQLite on), with a fresh cache (one model build);
  no-cache   a plain loop without the cache (every trial trains its own backdoored model).
The legs run interleaved for ``--repeats`` rounds (loop, tune, no-cache, then again), so a
neighbour's load hits all of them alike; the figures are medians over rounds, and the ratios
are medians of the per-round ratios (each from legs run minutes apart, not an hour apart).
Ray's start-up is paid once per session and reported on its own; a throwaway trial warms the
driver process up first. Each Tune leg starts a fresh trial worker (imports, first-trial warm-up):
a fixed cost per sweep, so the overhead ratio falls as ``--trials`` grows.

    Tune overhead = (tune - loop) / tune        (target: under 15 %)
    cache saving  = (no-cache - loop) / no-cache

It also checks that Tune computes the same thing: every trial's DER through Tune equals the
loop's (seeded trials are deterministic).

    python benchmarks/sweep_overhead.py --trials 4 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(num, den))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4, help="trials per leg (default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--defense-epochs", type=int, default=40, help="D3 epochs (digits default)")
    ap.add_argument("--attack-epochs", type=int, default=30, help="attack training epochs")
    ap.add_argument("--no-cache-leg", action="store_true",
                    help="skip the no-cache loop (the slowest leg)")
    args = ap.parse_args(argv)

    import ray
    import torch

    from d3tune.cache import ModelCache
    from d3tune.config import flatten, resolve, trial_config, unflatten
    from d3tune.specs.sweep_spec import ResourceSpec, RunPlan, SchedulerSpec
    from d3tune.search.sweep_driver import run_plan
    from d3tune.trial import run_trial

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    lrs = [round(0.005 * (i + 1), 4) for i in range(args.trials)]
    base = {"data": {"name": "digits"}, "attack": {"name": "badnets"},
            "train": {"epochs": args.attack_epochs},
            "defense": {"name": "d3", "epochs": args.defense_epochs}, "device": "cpu"}
    cfgs = [resolve(trial_config(unflatten({**flatten(base), "defense.lr": lr}))) for lr in lrs]
    times: dict[str, list[float]] = {"loop": [], "tune": [], "no-cache": []}
    der_gap = 0.0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
        ray_start = time.perf_counter() - t0
        # One throwaway trial first: the first trial of a process pays one-off warm-ups (thread
        # pools, allocator) that would otherwise land on round 1's loop leg only.
        warm = resolve(trial_config(unflatten({**flatten(base), "train.epochs": 1,
                                               "defense.epochs": 1})))
        run_trial(warm, cache=ModelCache(tmp / "cache-warmup"))
        for r in range(args.repeats):
            cache = ModelCache(tmp / f"cache-loop-{r}")
            t0 = time.perf_counter()
            loop_der = {cfg.defense.lr: run_trial(cfg, cache=cache).metrics["der"] for cfg in cfgs}
            times["loop"].append(time.perf_counter() - t0)

            plan = RunPlan(kind="ablation", name=f"overhead{r}", source="(benchmark)", base=base,
                           cells=tuple({"defense.lr": lr} for lr in lrs),
                           scheduler=SchedulerSpec(name="none"),
                           resources=ResourceSpec(cpu=float(cores)), max_concurrent=1,
                           storage=str(tmp / "tune"), experiment="overhead",
                           cache_dir=str(tmp / f"cache-tune-{r}"))
            t0 = time.perf_counter()
            df = run_plan(plan)
            times["tune"].append(time.perf_counter() - t0)
            der_gap = max([der_gap] + [abs(float(row["der"]) - loop_der[float(row["defense.lr"])])
                                       for _, row in df.iterrows()])

            if not args.no_cache_leg:
                t0 = time.perf_counter()
                for cfg in cfgs:
                    run_trial(cfg)
                times["no-cache"].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.repeats}: " + ", ".join(
                f"{k} {v[-1]:.1f} s" for k, v in times.items() if v), flush=True)
        ray.shutdown()

    load = os.getloadavg()
    print(f"\nmachine: {cores} CPU cores, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f} (1/5/15 min)")
    print(f"{args.trials} D3 trials of {args.defense_epochs} epochs on digits (badnets, attack "
          f"training {args.attack_epochs} epochs), {args.repeats} interleaved rounds, medians")
    print("| way | wall seconds (median) | per round |\n|---|---|---|")
    labels = {"loop": "plain loop, cache", "tune": "Ray Tune + MLflow, cache",
              "no-cache": "plain loop, no cache"}
    for k, v in times.items():
        if v:
            print(f"| {labels[k]} | {statistics.median(v):.1f} | "
                  f"{' / '.join(f'{x:.1f}' for x in v)} |")
    print(f"Ray start-up (once per session): {ray_start:.1f} s")
    overhead = 1 - median_ratio(times["loop"], times["tune"])
    print(f"tune overhead: {overhead:.1%} of the sweep's time "
          f"(per round: {', '.join(f'{1 - a / b:.1%}' for a, b in zip(times['loop'], times['tune']))})")
    print(f"same results through Tune: max |DER difference| = {der_gap:.2e}")
    if times["no-cache"]:
        saving = 1 - median_ratio(times["loop"], times["no-cache"])
        print(f"cache saving: {saving:.1%} of the no-cache loop's time "
              f"({median_ratio(times['no-cache'], times['loop']):.2f}x faster)")


if __name__ == "__main__":
    main()
