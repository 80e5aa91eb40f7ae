"""How d3tune's engine scales with the number of trials: Tune, the Optuna searcher and the
driver's MLflow callback, with every trial a real one shortened to about a second.

    python benchmarks/sweep_scale.py --trials 100,300            # MLflow on SQLite
    python benchmarks/sweep_scale.py --trials 100,500,2000 --tracking-uri http://127.0.0.1:5000

Each size is one sweep through ``run_plan`` (Optuna TPE, no scheduler, ``max_concurrent`` trials
of one CPU each, the backdoored model taken from a warm cache): digits, BadNets, D3 for one
epoch, evaluation on 64-image subsets. Printed per size, all measured in the same run:

- trials per minute, and the bookkeeping share: 1 - (sum of the trials' own seconds) /
  (wall seconds x concurrency), Ray's definition on its "Tune scalability" page;
- the driver's CPU seconds per trial (this process: Tune's controller, the searcher, the MLflow
  callback) and how that grows from the smallest size (target: at most 1.5x, no quadratic
  growth);
- MLflow write latency p50 / p99 (every call the callback makes, timed in the driver);
- the size of Tune's experiment folder and of the Optuna study;
- runs lost: trials without a FINISHED child run in MLflow (target: 0).

Ray's own anchor, printed beside: 10,000 one-second trials on one 16-CPU node took 715 s
against an ideal 625 s (about 14 % bookkeeping); the page treats over 20 % as too much.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

RAY_ANCHOR = ("Ray's 'Tune scalability' page: 10,000 one-second trials on one 16-CPU node, "
              "715 s against an ideal 625 s: ~14 % bookkeeping (over 20 % is too much)")


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_size(n: int, work: Path, concurrency: int, latencies: list[float],
             epochs: int = 1, subset: int = 64) -> dict:
    from mlflow.tracking import MlflowClient

    from d3tune import tracking
    from d3tune.search.sweep_driver import run_plan
    from d3tune.specs.sweep_spec import load_plan

    name = f"scale{n}"
    spec = work / f"{name}.yaml"
    spec.write_text(f"""
name: {name}
experiment: {name}
storage: {work / 'runs'}
cache_dir: {work / 'cache'}
num_samples: {n}
base:
  data: {{name: digits}}
  attack: {{name: badnets}}
  defense: {{name: d3, epochs: {epochs}}}
  eval: {{subset: {subset}}}
space:
  defense.lr: {{loguniform: [0.001, 0.1]}}
  defense.radius: {{uniform: [0.5, 3.0]}}
scheduler: {{name: none}}
resources: {{cpu: 1}}
max_concurrent: {concurrency}
max_failures: 0
""")
    plan = load_plan(spec, "sweep")
    before, t0 = cpu_s(), time.monotonic()
    start = len(latencies)
    df = run_plan(plan)
    wall, driver = time.monotonic() - t0, cpu_s() - before
    client = MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=50000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    finished = sum(r.info.status == "FINISHED" for r in children)
    trial_s = 0.0  # each trial's own seconds, as Tune counted them (its last result row)
    for result in plan.paths.experiment_dir.glob("*/result.json"):
        lines = result.read_text().splitlines()
        if lines:
            trial_s += float(json.loads(lines[-1]).get("time_total_s", 0.0))
    lat = sorted(latencies[start:])
    return {"trials": n, "ended": len(df), "wall_s": wall, "per_min": 60 * len(df) / wall,
            "trial_s": trial_s / max(1, len(df)),
            "bookkeeping": 1 - trial_s / (wall * concurrency), "driver_cpu_per_trial":
            driver / max(1, len(df)), "mlflow_calls": len(lat),
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else float("nan"),
            "p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else float("nan"),
            "tune_mb": folder_mb(plan.paths.experiment_dir),
            "state_mb": sum(p.stat().st_size for p in
                            plan.paths.experiment_dir.glob("experiment_state-*.json")) / 2**20,
            "optuna_mb": folder_mb(plan.paths.state_dir), "lost": n - finished}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", default="100,300", help="sweep sizes, comma-separated")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--tracking-uri", help="MLflow store (default: SQLite in the work folder)")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--defense-epochs", type=int, default=1,
                    help="D3 epochs per trial: the trial's length (1: about 0.5 s on digits, "
                    "2: about 1 s, the length Ray's anchor and the 10 %% target assume)")
    ap.add_argument("--eval-subset", type=int, default=64, help="evaluation images per set")
    args = ap.parse_args(argv)

    import ray

    from d3tune.search import mlflow_callback
    from d3tune.search.tuner import init_ray

    work = args.workdir or Path(tempfile.mkdtemp(prefix="d3tune-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    os.environ.setdefault("D3TUNE_SHIPPED_DEFAULTS", "0")
    latencies: list[float] = []
    timed = mlflow_callback.MlflowTuneCallback.attempt

    def attempt(self, what, fn):  # every MLflow call the driver's callback makes, timed
        t = time.perf_counter()
        try:
            return timed(self, what, fn)
        finally:
            latencies.append(time.perf_counter() - t)

    mlflow_callback.MlflowTuneCallback.attempt = attempt
    print(f"work folder {work}; MLflow {os.environ['MLFLOW_TRACKING_URI']}; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)
    init_ray(None)
    length = {"epochs": args.defense_epochs, "subset": args.eval_subset}
    one_size(2, work, args.concurrency, [], **length)  # warm the model cache and the trial workers
    rows = []
    for n in map(int, args.trials.split(",")):
        row = one_size(n, work, args.concurrency, latencies, **length)
        rows.append(row)
        print(f"{n:5d} trials of {row['trial_s']:.2f} s each: {row['wall_s']:7.1f} s, "
              f"{row['per_min']:5.1f} trials/min, "
              f"bookkeeping {100 * row['bookkeeping']:4.1f} %, driver CPU "
              f"{row['driver_cpu_per_trial']:.3f} s/trial, MLflow p50 {row['p50_ms']:.1f} ms "
              f"p99 {row['p99_ms']:.1f} ms ({row['mlflow_calls']} calls), Tune folder "
              f"{row['tune_mb']:.1f} MB (experiment state {row['state_mb']:.1f} MB), study+ledger {row['optuna_mb']:.1f} MB, lost "
              f"{row['lost']}; load average {os.getloadavg()[0]:.2f}", flush=True)
    first = rows[0]
    for row in rows[1:]:
        print(f"driver CPU per trial at {row['trials']} / at {first['trials']}: "
              f"{row['driver_cpu_per_trial'] / first['driver_cpu_per_trial']:.2f}x "
              f"(target <= 1.5x)")
    print(f"bookkeeping: {statistics.median(r['bookkeeping'] for r in rows) * 100:.1f} % "
          f"median over sizes (target <= 10 %); runs lost: {sum(r['lost'] for r in rows)}")
    print(RAY_ANCHOR)
    ray.shutdown()


if __name__ == "__main__":
    main()
