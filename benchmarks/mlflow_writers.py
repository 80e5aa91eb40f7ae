"""MLflow's SQLite store under concurrent writers, against a tracking server on PostgreSQL.

    python benchmarks/mlflow_writers.py --writers 8,32 --runs 4 --epochs 40
    python benchmarks/mlflow_writers.py --writers 8,32 --postgres   # also a server on PostgreSQL

Why: in d3tune only a driver writes to MLflow (trials report to Tune), so one sweep is one
writer. Several writers meet in one store when several drivers or ``d3tune run`` processes
share it: sweeps started side by side, SLURM jobs pointing at one ``mlflow.db`` on shared
storage. Each writer here is a process that logs what a d3tune driver logs for a trial: a
child run, its params, one ``log_batch`` of 8 metrics per epoch, the final status; all writers
start at once. Printed per backend and writer count: wall time, write latency p50/p99, calls
that raised (MLflow retries "database is locked" itself; what still fails is lost unless the
caller retries), and metric rows found afterwards against rows written (lost writes).

``--postgres`` starts its own PostgreSQL (Debian's binaries, run as the ``postgres`` user, in a
temporary folder, listening on 127.0.0.1) and an ``mlflow server`` on it, and stops both.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METRICS = ("acc", "asr", "ra", "der", "loss", "loss_clean", "loss_dist", "epoch_s")


def writer(uri: str, exp_id: str, runs: int, epochs: int, start: float, out: "mp.Queue") -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    while time.time() < start:  # every writer starts at the same moment
        time.sleep(0.001)
    lat, errors, written = [], 0, 0
    for r in range(runs):
        try:
            t = time.perf_counter()
            run = client.create_run(exp_id, run_name=f"w{os.getpid()}-{r}")
            lat.append(time.perf_counter() - t)
            client.log_batch(run.info.run_id, params=[])
        except Exception:
            errors += 1
            continue
        for epoch in range(1, epochs + 1):
            ms = int(time.time() * 1000)
            batch = [Metric(k, 0.5, ms, epoch) for k in METRICS]
            t = time.perf_counter()
            try:
                client.log_batch(run.info.run_id, metrics=batch)
                written += len(batch)
            except Exception:
                errors += 1
            lat.append(time.perf_counter() - t)
        try:
            client.set_terminated(run.info.run_id, "FINISHED")
        except Exception:
            errors += 1
    out.put({"lat": lat, "errors": errors, "written": written})


def count_rows(uri: str, exp_id: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    total = 0
    for run in client.search_runs([exp_id], max_results=5000):
        for key in METRICS:
            total += len(client.get_metric_history(run.info.run_id, key))
    return total


def measure(uri: str, writers: int, runs: int, epochs: int) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    exp_id = MlflowClient(uri).create_experiment(f"writers-{writers}-{time.time_ns()}")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 3 + 0.05 * writers  # time for every process to import mlflow
    procs = [ctx.Process(target=writer, args=(uri, exp_id, runs, epochs, start, out))
             for _ in range(writers)]
    for p in procs:
        p.start()
    parts = [out.get(timeout=3600) for _ in procs]
    wall = time.time() - start
    for p in procs:
        p.join()
    lat = sorted(x for part in parts for x in part["lat"])
    written = sum(p["written"] for p in parts)
    return {"writers": writers, "wall_s": wall, "calls": len(lat),
            "p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[int(len(lat) * 0.99)],
            "errors": sum(p["errors"] for p in parts), "expected": writers * runs * epochs
            * len(METRICS), "written": written, "found": count_rows(uri, exp_id)}


def _ui_helpers():
    """free_port and wait_http, shared with the documented MLflow UI check."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "docs" / "results" / "mlflow_ui_check.py"
    spec = importlib.util.spec_from_file_location("mlflow_ui_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.free_port, module.wait_http


def postgres_server(tmp: Path) -> tuple[str, list[subprocess.Popen]]:
    """PostgreSQL in ``tmp`` (as the postgres user) and an MLflow server on it."""
    free_port, wait_http = _ui_helpers()
    pg_bin = max(Path("/usr/lib/postgresql").glob("*/bin"))
    data = tmp / "pg" / "data"
    data.parent.mkdir(parents=True)
    os.chmod(tmp, 0o755)
    shutil.chown(data.parent, "postgres", "postgres")
    subprocess.run(["runuser", "-u", "postgres", "--", str(pg_bin / "initdb"), "-D", str(data),
                    "-U", "postgres", "--auth=trust"], check=True, capture_output=True)
    port, web = free_port(), free_port()
    pg = subprocess.Popen(["runuser", "-u", "postgres", "--", str(pg_bin / "postgres"), "-D",
                           str(data), "-c", "listen_addresses=127.0.0.1", "-p", str(port), "-k",
                           str(data.parent)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(120):
        if subprocess.run([str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                           "postgres", "mlflow"], capture_output=True).returncode == 0:
            break
        time.sleep(0.5)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow", "--artifacts-destination",
         (tmp / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(web), "--workers",
         "4"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_http(f"http://127.0.0.1:{web}/health", 240)
    return f"http://127.0.0.1:{web}", [server, pg]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", default="8,32")
    ap.add_argument("--runs", type=int, default=4, help="child runs per writer")
    ap.add_argument("--epochs", type=int, default=40, help="log_batch calls per run")
    ap.add_argument("--postgres", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        backends = [("sqlite", lambda n: f"sqlite:///{Path(tmp) / f'w{n}.db'}")]
        procs: list[subprocess.Popen] = []
        if args.postgres:
            url, procs = postgres_server(Path(tmp))
            backends.append(("postgres server", lambda n: url))
        try:
            rows = []
            for name, uri in backends:
                for n in map(int, args.writers.split(",")):
                    row = {"backend": name, **measure(uri(n), n, args.runs, args.epochs)}
                    rows.append(row)
                    print(f"{name:16s} writers {n:3d}: {row['wall_s']:6.1f} s, "
                          f"{row['calls']} calls, p50 {row['p50_ms']:.0f} ms, "
                          f"p99 {row['p99_ms']:.0f} ms, errors {row['errors']}, metric rows "
                          f"{row['found']}/{row['expected']} found "
                          f"(lost {row['expected'] - row['found']})", flush=True)
            print(json.dumps(rows))
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGINT if p is procs[-1] else signal.SIGTERM)
                p.wait(60)
        print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
