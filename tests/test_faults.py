"""Faults mid-sweep: a killed trial worker is retried from its checkpoint; an MLflow store that
goes away costs warnings, never results."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from d3tune.specs.sweep_spec import load_plan  # noqa: E402
from d3tune.search.sweep_driver import run_plan  # noqa: E402
from d3tune.search.mlflow_callback import load_ledger  # noqa: E402

BASE = """
base:
  data: {name: digits}
  attack: {name: badnets}
  train: {epochs: 3}
  defense: {name: d3, epochs: 6}
  eval: {subset: 100, every: 1}  # every epoch: the tests watch per-epoch steps
"""


def _spec(tmp_path: Path, name: str, extra: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(textwrap.dedent(f"""
        name: {name}
        storage: {tmp_path / 'tune'}
        cache_dir: {tmp_path / 'cache'}
        experiment: faults
        max_concurrent: 1
        scheduler: {{name: none}}
        """) + BASE + textwrap.dedent(extra))
    return p


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, cmdline) of every process below ``pid`` (from /proc; no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            out.append((child, cmd))
            stack.append(child)
    return out


def test_killed_trial_worker_is_retried_from_its_checkpoint(local_ray, tmp_path, monkeypatch):
    monkeypatch.setattr("d3tune.search.mlflow_callback.FLUSH_EVERY_S", 0.0)  # the killer watches steps
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    spec = _spec(tmp_path, "retry", """
        space:
          defense.lr: {choice: [0.01]}
        num_samples: 2
        max_failures: 2
        checkpoint_every_s: 0
        """)
    state = tmp_path / "tune" / "retry.d3tune" / "mlflow_state.json"
    killed: list[int] = []

    def killer() -> None:  # SIGKILL the first trial's worker once it reported epoch >= 2
        end = time.monotonic() + 600
        while time.monotonic() < end and not killed:
            try:
                steps = load_ledger(state.parent)["steps"]
            except (OSError, ValueError, KeyError):
                steps = {}
            if any(v >= 2 for v in steps.values()):
                for pid, cmd in _descendants(os.getpid()):
                    if cmd.startswith("ray::ImplicitFunc"):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        break
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    df = run_plan(load_plan(spec, "sweep"))
    t.join(5)
    assert killed, "no trial worker was found to kill"
    assert len(df) == 2 and not df["error"].any() and (df["epoch"] == 6).all()
    import sqlite3

    with sqlite3.connect(db) as con:
        per_run = con.execute("select run_uuid, count(*), count(distinct step) from metrics "
                              "where key='acc' group by run_uuid").fetchall()
        statuses = [r[0] for r in con.execute("select status from runs")]
    assert len(per_run) == 2 and all(n == 6 and d == 6 for _, n, d in per_run)  # no repeats
    assert statuses.count("FINISHED") == 3
    # the retried trial restored its defense checkpoint instead of starting over
    result_files = list((tmp_path / "tune" / "retry").glob("*/result.json"))
    restored = 0
    for f in result_files:
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        epochs = [r["epoch"] for r in rows]
        if len(epochs) != len(set(epochs)) or epochs != sorted(epochs):
            restored += 1  # a restart from scratch would repeat epoch 1
    assert restored == 0
    # Every epoch checkpointed, as asked (the retry above continued from one); each finished
    # trial's last checkpoint was then dropped from storage (the ledger replays ended trials)
    assert not list((tmp_path / "tune" / "retry").glob("*/checkpoint_*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_store_lost_mid_sweep_keeps_results_and_completes(local_ray, tmp_path, monkeypatch,
                                                                 caplog):
    monkeypatch.setattr("d3tune.search.mlflow_callback.FLUSH_EVERY_S", 0.0)  # the outage waits for steps
    monkeypatch.setattr("d3tune.search.mlflow_callback.FINAL_PATIENCE_S", 0.0)  # it stays down
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        spec = _spec(tmp_path, "outage", """
            space:
              defense.lr: {loguniform: [0.005, 0.05]}
            num_samples: 3
            """)
        state = tmp_path / "tune" / "outage.d3tune" / "mlflow_state.json"

        def stop_server() -> None:  # the store goes away once the first trial is logging
            end = time.monotonic() + 600
            while time.monotonic() < end:
                try:
                    if load_ledger(state.parent)["steps"]:
                        break
                except (OSError, ValueError, KeyError):
                    pass
                time.sleep(0.2)
            os.killpg(server.pid, signal.SIGKILL)

        t = threading.Thread(target=stop_server, daemon=True)
        t.start()
        with caplog.at_level("WARNING"):
            df = run_plan(load_plan(spec, "sweep"))
        t.join(5)
        assert server.poll() is not None  # the server really went away mid-sweep
        assert len(df) == 3 and not df["error"].any() and (df["epoch"] == 6).all()
        assert any("MLflow" in r.getMessage() and "failed" in r.getMessage()
                   for r in caplog.records)
        # every trial's results are in Tune's storage
        results = list((tmp_path / "tune" / "outage").glob("*/result.json"))
        assert len(results) == 3
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
