"""A d3tune ablation on a cluster of network namespaces (tests/cluster_harness.py): a Ray head
and two workers with their own addresses, MLflow on PostgreSQL, a shared folder for storage,
the model cache and artifacts; then the faults a real cluster meets. Each test asserts that
nothing is lost or logged twice and that no run or trial is left RUNNING.

Slow (minutes each on 2 cores), and skipped, saying why, without root, PostgreSQL or psycopg2.
"""
from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import cluster_harness

from d3tune.search.mlflow_callback import load_ledger

pytestmark = pytest.mark.slow

TRIAL = """
base:
  data: {name: digits}
  attack: {name: badnets}
  train: {epochs: 3}
  defense: {name: d3, epochs: EPOCHS}
  eval: {subset: 100, every: 1}
resources: {cpu: 1}
max_concurrent: 2
max_failures: 2
checkpoint_every_s: 0
"""

DUMP = r"""
import json, sys
from mlflow.tracking import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name(sys.argv[1])
out = []
for r in (c.search_runs([exp.experiment_id], max_results=500) if exp else []):
    hist = [m.step for m in c.get_metric_history(r.info.run_id, "der")]
    out.append({"id": r.info.run_id, "status": r.info.status, "tags": r.data.tags,
                "params": r.data.params, "der_steps": hist})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def cluster():
    reason = cluster_harness.skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="d3tc", dir="/tmp"))
    c = None
    try:
        c = cluster_harness.up(root)
        yield c
    finally:
        if c is not None:
            c.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workers_up(cluster):
    """Both workers alive before a test (a fault test may have killed one)."""
    for name in ("worker-1", "worker-2"):
        if f"ray-{name}" not in cluster.procs:
            cluster.start_worker(name)
    deadline = time.monotonic() + 120
    want = {n.ip for n in cluster.nodes.values()}
    while set(cluster.alive_nodes()) != want:
        assert time.monotonic() < deadline, "the workers did not rejoin"
        time.sleep(2)
    return cluster


def write_spec(c: cluster_harness.Cluster, name: str, radii: list[float], epochs: int = 3) -> Path:
    spec = c.root / f"{name}.yaml"
    spec.write_text(f"name: {name}\nexperiment: {name}\nstorage: {c.root / 'runs'}\n"
                    f"cache_dir: {c.root / 'models'}\n"
                    + textwrap.dedent(TRIAL).replace("EPOCHS", str(epochs))
                    + f"axes:\n  defense.radius: {radii}\nseeds: [0]\n")
    return spec


def ablate(c: cluster_harness.Cluster, spec: Path, *extra: str, timeout: float = 900):
    return c.run("head", [sys.executable, "-m", "d3tune", "ablate", str(spec), "--address",
                          c.address, *extra], timeout=timeout)


def start_ablate(c: cluster_harness.Cluster, spec: Path, role: str, *extra: str):
    return c.popen(role, "head", [sys.executable, "-m", "d3tune", "ablate", str(spec),
                                  "--address", c.address, *extra])


def runs(c: cluster_harness.Cluster, experiment: str) -> tuple[list[dict], list[dict]]:
    done = c.run("head", [sys.executable, "-c", DUMP, experiment], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    parents = [r for r in rows if "mlflow.parentRunId" not in r["tags"]]
    return parents, [r for r in rows if "mlflow.parentRunId" in r["tags"]]


def result_files(c: cluster_harness.Cluster, experiment: str, live: bool = False) -> list[Path]:
    """Each trial's result.json. The copy in storage lags: Tune syncs it from the driver's
    staging folder at its experiment snapshots, which can come after a trial has ended. A test
    that must act while a trial runs reads the staging folder on the head instead (``live``)."""
    if live:
        return sorted((c.root / "ray" / "h").glob(
            f"session_*/artifacts/*/{experiment}/driver_artifacts/*/result.json"))
    return sorted((c.root / "runs").glob(f"{experiment}/*/result.json"))


def read_rows(result: Path) -> list[dict]:
    return [json.loads(x) for x in result.read_text().splitlines() if x]


def trial_rows(c: cluster_harness.Cluster, name: str, live: bool = False) -> dict[str, list[dict]]:
    return {result.parent.name: read_rows(result) for result in result_files(c, name, live)}


def ledger(c: cluster_harness.Cluster, name: str) -> dict:
    return load_ledger(c.root / "runs" / f"{name}.d3tune")


def check_complete(c: cluster_harness.Cluster, name: str, cells: int, epochs: int) -> list[dict]:
    """Every planned trial ended once, in the ledger and in MLflow (PostgreSQL), with every
    epoch logged once; nothing RUNNING."""
    book = ledger(c, name)
    assert len(book["done"]) == cells and not book["failed"] and not book["closing"], book
    parents, children = runs(c, name)
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED"
    assert len(children) == cells, [ch["params"].get("defense.radius") for ch in children]
    assert all(ch["status"] == "FINISHED" for ch in children)
    assert sorted(float(ch["params"]["defense.radius"]) for ch in children) == sorted(
        set(float(ch["params"]["defense.radius"]) for ch in children))  # none logged twice
    for ch in children:  # epochs 1..N once each, and the final figure once (at step 0)
        assert sorted(ch["der_steps"]) == list(range(epochs + 1)), ch["der_steps"]
        assert ch["tags"]["mlflow.parentRunId"] == parents[0]["id"]
    return children


def test_an_ablation_spreads_over_both_workers_and_logs_to_postgres(workers_up):
    c = workers_up
    assert set(c.alive_nodes()) == {n.ip for n in c.nodes.values()}
    spec = write_spec(c, "spread", [0.5, 1.0, 1.5, 2.0])
    done = ablate(c, spec)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    children = check_complete(c, "spread", cells=4, epochs=3)
    workers = {c.nodes[n].ip for n in ("worker-1", "worker-2")}
    assert {ch["tags"]["d3tune.node_ip"] for ch in children} == workers  # both, head none
    rows = trial_rows(c, "spread")
    assert {r["node_ip"] for trial in rows.values() for r in trial} == workers
    # one backdoored model for the whole cluster: built once, in the shared cache
    assert len(list((c.root / "models").rglob("model.safetensors"))) == 1
    assert sum(trial[-1]["cache_builds"] for trial in rows.values()) == 1
    artifacts = list((c.root / "mlflow-artifacts").rglob("spread.yaml"))
    assert artifacts, "the spec artifact reached the shared artifact store"


def test_a_worker_lost_mid_ablation_has_its_trials_retried_on_the_other(workers_up):
    c = workers_up
    name, epochs = "lost_worker", 12
    spec = write_spec(c, name, [0.5, 1.0, 1.5, 2.0], epochs=epochs)
    driver = start_ablate(c, spec, f"driver-{name}")
    victim = c.nodes["worker-1"].ip
    deadline = time.monotonic() + 600
    # a trial of the victim is mid-run: past its second epoch, with epochs still to go
    while not any(trial[-1].get("node_ip") == victim and 2 <= trial[-1].get("epoch", 0) < epochs - 2
                  for trial in trial_rows(c, name, live=True).values() if trial):
        assert time.monotonic() < deadline and driver.poll() is None, c.log(f"driver-{name}")
        time.sleep(0.5)
    c.kill_worker("worker-1")  # every Ray process of that node, at once
    assert driver.wait(timeout=900) == 0, c.log(f"driver-{name}")[-4000:]
    children = check_complete(c, name, cells=4, epochs=epochs)
    survivor = c.nodes["worker-2"].ip
    rows = trial_rows(c, name)
    moved = [t for t, trial in rows.items() if {r["node_ip"] for r in trial} == {victim, survivor}]
    assert moved, ("no trial of the lost worker finished on the other one", victim, {
        t: " ".join(f'{r.get("epoch")}@{r.get("node_ip")}' for r in trial) for t, trial in rows.items()})
    assert {ch["tags"]["d3tune.node_ip"] for ch in children} <= {victim, survivor}


def test_mlflow_down_for_30_s_mid_ablation_misses_nothing(workers_up):
    c = workers_up
    name, epochs = "mlflow_outage", 10
    spec = write_spec(c, name, [0.5, 1.0, 1.5, 2.0], epochs=epochs)
    driver = start_ablate(c, spec, f"driver-{name}")
    deadline = time.monotonic() + 600
    while not trial_rows(c, name, live=True):
        assert time.monotonic() < deadline and driver.poll() is None, c.log(f"driver-{name}")
        time.sleep(0.5)
    c.stop_mlflow()  # the tracking server goes away mid-ablation ...
    time.sleep(30)
    c.start_mlflow()  # ... and comes back
    assert driver.wait(timeout=900) == 0, c.log(f"driver-{name}")[-4000:]
    assert "MLflow" in c.log(f"driver-{name}")  # it said so while it was down
    check_complete(c, name, cells=4, epochs=epochs)


def test_a_sigkilled_driver_resumes_and_the_ablation_finishes(workers_up):
    c = workers_up
    name, epochs = "killed_driver", 6
    spec = write_spec(c, name, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0], epochs=epochs)
    driver = start_ablate(c, spec, f"driver-{name}")
    deadline = time.monotonic() + 600
    while len(ledger(c, name)["done"] if (c.root / "runs" / f"{name}.d3tune" /
                                          "mlflow_state.json").exists() else []) < 2:
        assert time.monotonic() < deadline and driver.poll() is None, c.log(f"driver-{name}")
        time.sleep(0.5)
    cluster_harness.stop_group(c.procs.pop(f"driver-{name}"), first=signal.SIGKILL)
    done = ablate(c, spec, "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_complete(c, name, cells=6, epochs=epochs)


ROBUST = """
defense: d3
base:
  train: {epochs: 3}
  defense: {epochs: 8}
population:
  attacks: [badnets, blended]
  seeds: [0, 1]
holdout_seeds: [2]
budget: 4
top_k: 1
max_acc_drop: 0.9
min_asr: 0.0
search_seed: 0
space:
  defense.lr: {loguniform: [0.005, 0.05]}
  defense.eps: {uniform: [0.0, 0.3]}
resources: {cpu: 1}
max_concurrent: 2
max_failures: 2
"""


def robust(c: cluster_harness.Cluster, name: str, fault=None) -> tuple[dict, list[dict]]:
    """A small robust search on the cluster; ``fault(c, name)`` runs while it does. Returns
    the chosen defaults and the search's per-setting rows."""
    spec = c.root / f"{name}.yaml"
    spec.write_text(f"name: {name}\nexperiment: {name}\nstorage: {c.root / 'runs'}\n"
                    f"cache_dir: {c.root / 'models'}\n" + textwrap.dedent(ROBUST))
    chosen = c.root / f"{name}.chosen.yaml"
    driver = c.popen(f"driver-{name}", "head", [
        sys.executable, "-m", "d3tune", "robust", str(spec), "--address", c.address,
        "--out", str(chosen)])
    if fault is not None:
        fault(c, name, driver)
    assert driver.wait(timeout=1200) == 0, c.log(f"driver-{name}")[-4000:]
    import yaml

    search = next((c.root / "runs").rglob(f"{name}*/**/search.json"))
    return yaml.safe_load(chosen.read_text()), json.loads(search.read_text())


def test_a_worker_lost_in_a_robust_search_keeps_its_decisions_exact(workers_up):
    """The same search with and without a worker lost mid-way: the retried member evaluations
    give the same figures (trials are deterministic given config, seed and thread count), so
    the chosen setting is the same, and every setting pruned was provably behind it."""
    c = workers_up
    reference, ref_rows = robust(c, "robust_ref")
    victim = c.nodes["worker-1"].ip

    def lose_worker(c, name, driver):
        deadline = time.monotonic() + 600
        # a setting on the victim with some of its members done and some still to do
        while not any(trial[-1].get("node_ip") == victim
                      and 1 <= trial[-1].get("members_done", 0) < trial[-1]["members_total"]
                      for trial in trial_rows_any(c, name, live=True) if trial):
            assert time.monotonic() < deadline and driver.poll() is None, c.log(f"driver-{name}")
            time.sleep(0.3)
        c.kill_worker("worker-1")

    faulted, rows = robust(c, "robust_fault", lose_worker)
    assert faulted["defense"] == reference["defense"]
    both = {victim, c.nodes["worker-2"].ip}
    assert any({r["node_ip"] for r in trial} == both
               for trial in trial_rows_any(c, "robust_fault")), "a setting was retried"
    by_setting = {json.dumps(r["setting"], sort_keys=True): r for r in ref_rows}
    best = max(r["worst_der"] for r in rows if r["complete"])
    for r in rows:
        ref = by_setting[json.dumps(r["setting"], sort_keys=True)]  # same settings sampled
        for member, der in r["ders"].items():  # every member evaluated: the same figure
            assert der == pytest.approx(ref["ders"][member], abs=1e-9), (member, r["setting"])
        if r["pruned"]:  # stopped only when already behind the best complete setting
            assert r["worst_der"] <= best


def trial_rows_any(c: cluster_harness.Cluster, name: str, live: bool = False) -> list[list[dict]]:
    """Result rows of every trial of the search (its Tune experiments are named ``name*``)."""
    return [read_rows(result) for result in result_files(c, f"{name}*", live)]
