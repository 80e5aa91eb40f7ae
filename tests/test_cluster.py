"""Across a cluster: cluster.yaml passes Ray's launcher validation, a sweep spreads over a
two-node Ray cluster on this machine (token auth on), a real MLflow server receives a sweep, and
a dead --address fails fast.

The nodes and servers these tests start are stopped by their own process groups (never with a
plain `ray stop`, which would end every Ray process on the machine), and every address is on
this machine.
"""
from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from cluster_harness import stop_group  # noqa: E402  (by process group, never `ray stop`)

REPO = Path(__file__).resolve().parents[1]
TINY = """
base:
  data: {name: digits}
  attack: {name: badnets}
  train: {epochs: 3}
  defense: {name: d3, epochs: 2}
  eval: {subset: 100, every: 1}  # every epoch: the tests count per-epoch steps
space:
  defense.lr: {loguniform: [0.005, 0.05]}
metric: der
mode: max
scheduler: {name: none}
resources: {cpu: 1}
max_concurrent: 2
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spec(folder: Path, name: str, num_samples: int, **fields: str) -> Path:
    extra = "".join(f"{k}: {v}\n" for k, v in fields.items())
    spec = folder / f"{name}.yaml"
    spec.write_text(f"name: {name}\nstorage: {folder / 'tune'}\nexperiment: {name}\n"
                    f"num_samples: {num_samples}\n{extra}" + textwrap.dedent(TINY))
    return spec


# ---------------------------------------------------------------------------------------------
# Processes this module starts: each in its own session, stopped by process group.


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise AssertionError(f"{what} did not come up (exit {proc.poll()}):\n{tail}")


def ray_env(token: str, cache_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # Token auth stays on; a token of this test's own, so no other cluster or driver can join.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, D3TUNE_CACHE_DIR=str(cache_dir))
    return env


def mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} at {uri}"
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


# ---------------------------------------------------------------------------------------------
# 1. cluster.yaml


def _on_prem_block(text: str) -> dict:
    lines = text.splitlines()
    begin = next(i for i, line in enumerate(lines) if line.startswith("# >>> on-prem variant"))
    end = next(i for i, line in enumerate(lines) if line.startswith("# <<< on-prem variant"))
    return yaml.safe_load("\n".join(line[2:] for line in lines[begin + 1:end]))


def test_cluster_yaml_passes_rays_launcher_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (REPO / "cluster.yaml").read_text()
    raw = yaml.safe_load(text)
    cfg = prepare_config(copy.deepcopy(raw))  # offline: merges the provider's defaults.yaml
    validate_config(cfg)  # Ray's JSON schema + node-type checks; no cloud API is called

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert gpu and all(t["resources"]["GPU"] >= 1 and t["max_workers"] >= t["min_workers"] >= 0
                       for t in gpu)
    setup = " ".join(cfg["setup_commands"])
    assert "torch==2.14.1" in setup and "torchvision==0.29.1" in setup and "ray[" in setup
    assert setup.index("torch==") < setup.index("~/d3tune")  # pinned deps, then the package
    mounts = cfg["file_mounts"]
    for local in ("./d3tune", "./pyproject.toml", "./search_spaces", "./ablations"):
        assert local in mounts.values()
    for local in ("d3tune", "pyproject.toml", "search_spaces"):
        assert (REPO / local).exists()
    assert "~/.ray/auth_token" in mounts  # every node gets the cluster's token
    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head_start
    assert "RAY_AUTH_MODE=token ray start --address" in worker_start
    assert "mlflow server" in head_start and "--host 127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=disabled" not in text

    # The on-prem variant in the comment block: the `local` provider with one node type.
    onprem = copy.deepcopy(raw)
    for key in ("available_node_types", "head_node_type"):
        onprem.pop(key)
    onprem.update(_on_prem_block(text))
    assert onprem["provider"]["type"] == "local"
    validate_config(prepare_config(onprem))


# ---------------------------------------------------------------------------------------------
# 2. A dead --address


@pytest.mark.parametrize("address", ["127.0.0.1:1", "127.0.0.1"])
def test_dead_address_exits_2_with_one_line_fast(tmp_path, capsys, address):
    from d3tune.cli import main

    if ray.is_initialized():
        pytest.skip("another test left Ray running in this process")
    spec = write_spec(tmp_path, "nowhere", 1)
    t0 = time.monotonic()
    assert main(["sweep", str(spec), "--address", address]) == 2
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--address" in err[0] and address in err[0], err
    assert not ray.is_initialized()


# ---------------------------------------------------------------------------------------------
# 3. A real MLflow tracking server


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    log = tmp_path / "mlflow_server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = start([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                  "--port", str(port), "--workers", "1",
                  "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                  "--artifacts-destination", str(tmp_path / "server_artifacts")], env, log)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for("mlflow server", healthy, proc, log, 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc, grace=5)


@pytest.mark.slow
def test_sweep_logs_to_a_mlflow_tracking_server(mlflow_server, tmp_path, monkeypatch):
    from d3tune.cli import main

    if ray.is_initialized():
        pytest.skip("another test left Ray running in this process")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("D3TUNE_CACHE_DIR", str(tmp_path / "cache"))
    spec = write_spec(tmp_path, "served", 2)
    assert main(["sweep", str(spec)]) == 0  # a local Ray, no --address
    parents, children = mlflow_runs(mlflow_server, "served")
    assert len(parents) == 1 and len(children) == 2
    assert all(c.data.metrics.get("der") is not None for c in children)
    assert all(c.data.tags.get("d3tune.node_id") for c in children)


# ---------------------------------------------------------------------------------------------
# 4. Two Ray nodes on this machine (last: the module-scoped cluster stops when they are done)


@pytest.fixture(scope="module")
def two_nodes():
    """Head (1 CPU) + worker (1 CPU, resource worker_node) with token auth; each node has its
    own D3TUNE_CACHE_DIR in its environment, which its trial processes inherit."""
    tmp = Path(tempfile.mkdtemp(prefix="d3tc-", dir="/tmp"))  # short: Ray's socket paths
    port, token = free_port(), secrets.token_hex(32)
    bin_ray = str(Path(sys.executable).with_name("ray"))
    common = ["--num-cpus", "1", "--object-store-memory", str(100 * 2**20),
              "--disable-usage-stats", "--block"]
    procs: list[subprocess.Popen] = []
    try:
        head_log, worker_log = tmp / "head.log", tmp / "worker.log"
        procs.append(start([bin_ray, "start", "--head", "--node-ip-address", "127.0.0.1",
                            "--port", str(port), "--temp-dir", str(tmp / "ray"),
                            "--include-dashboard", "false", *common],
                           ray_env(token, tmp / "cache_head"), head_log))
        wait_for("head node", lambda: "Ray runtime started" in head_log.read_text(errors="replace"),
                 procs[0], head_log, 120)
        procs.append(start([bin_ray, "start", "--address", f"127.0.0.1:{port}",
                            "--resources", json.dumps({"worker_node": 1}), *common],
                           ray_env(token, tmp / "cache_worker"), worker_log))
        wait_for("worker node",
                 lambda: "Ray runtime started" in worker_log.read_text(errors="replace"),
                 procs[1], worker_log, 120)
        yield {"address": f"127.0.0.1:{port}", "token": token, "tmp": tmp}
    finally:
        for proc in reversed(procs):  # worker first, then the head
            stop_group(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def run_sweep(spec: Path, address: str, env: dict[str, str], cwd: Path) -> tuple[float, str]:
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "d3tune", "sweep", str(spec), "--address", address]
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return wall, done.stdout


def tune_rows(exp_dir: Path) -> dict[str, list[dict]]:
    """Every result row Tune wrote, per trial folder."""
    out = {}
    for result in exp_dir.glob("*/result.json"):
        out[result.parent.name] = [json.loads(x) for x in result.read_text().splitlines() if x]
    return out


def check_two_node_sweep(folder: Path, name: str, db: Path) -> tuple[set[str], list[dict]]:
    rows = tune_rows(folder / "tune" / name)
    assert len(rows) == 4 and all(rows.values())
    nodes = {r["node_id"] for trial in rows.values() for r in trial}
    assert len(nodes) == 2, nodes  # trials ran on both nodes
    parents, children = mlflow_runs(f"sqlite:///{db}", name)
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.tags["d3tune.node_id"] for c in children} == nodes
    assert all(c.info.status == "FINISHED" for c in children)
    return nodes, [trial[-1] for trial in rows.values()]


@pytest.mark.slow
def test_sweep_spreads_over_two_nodes_with_a_cache_per_node(two_nodes, tmp_path):
    db = tmp_path / "mlflow.db"
    env = ray_env(two_nodes["token"], tmp_path / "driver_cache")  # the driver's own, unused
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    spec = write_spec(tmp_path, "pernode", 4)  # no cache_dir: each node's D3TUNE_CACHE_DIR
    wall, _ = run_sweep(spec, two_nodes["address"], env, tmp_path)
    nodes, last = check_two_node_sweep(tmp_path, "pernode", db)
    # one backdoored model per node, built once on each
    for node_cache in ("cache_head", "cache_worker"):
        assert len(list((two_nodes["tmp"] / node_cache).rglob("model.safetensors"))) == 1
    assert sum(r["cache_builds"] for r in last) == 2
    assert not (tmp_path / "driver_cache").exists()
    print(f"\ntwo-node sweep (per-node cache): {wall:.1f} s, nodes {sorted(nodes)}, "
          "1 parent + 4 child runs")


@pytest.mark.slow
def test_sweep_over_two_nodes_builds_each_model_once_in_a_shared_cache(two_nodes, tmp_path):
    db = tmp_path / "mlflow.db"
    env = ray_env(two_nodes["token"], tmp_path / "driver_cache")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    env.pop("RAY_AUTH_MODE")  # d3tune turns token auth on for --address by itself
    shared = tmp_path / "shared_cache"
    spec = write_spec(tmp_path, "shared", 4, cache_dir=str(shared))
    wall, _ = run_sweep(spec, two_nodes["address"], env, tmp_path)
    nodes, last = check_two_node_sweep(tmp_path, "shared", db)
    assert len(list(shared.rglob("model.safetensors"))) == 1
    assert sum(r["cache_builds"] for r in last) == 1  # built once across both nodes
    print(f"\ntwo-node sweep (shared cache): {wall:.1f} s, nodes {sorted(nodes)}")


@pytest.mark.slow
def test_adopted_defaults_reach_the_worker_node(two_nodes, tmp_path):
    """The driver's D3TUNE_DEFAULTS_DIR (adopted defaults on shared storage) is what a trial on
    the worker node reads, though that node's Ray was started without it."""
    env = {**ray_env(two_nodes["token"], tmp_path / "cache"),
           "D3TUNE_DEFAULTS_DIR": str(tmp_path / "shared_defaults")}
    code = (
        "import os, ray\n"
        "from d3tune.search.tuner import init_ray\n"
        f"init_ray({two_nodes['address']!r})\n"
        "@ray.remote(num_cpus=0, resources={'worker_node': 0.01})\n"
        "def probe():\n"
        "    from d3tune.adopted_defaults import folders\n"
        "    return [str(p) for p in folders()]\n"
        "print('FOLDERS', ray.get(probe.remote()))\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("FOLDERS"))
    assert str(tmp_path / "shared_defaults") in line, line
