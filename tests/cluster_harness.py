"""A cluster you cannot tell from a real one, on this machine: Ray nodes in their own network
namespaces, MLflow on PostgreSQL, a shared folder standing in for NFS.

    head      10.<n>.0.1   Ray head (token auth, no CPUs for trials), PostgreSQL, MLflow server,
                           the d3tune driver (Optuna's storage is a file on the shared folder)
    worker-1  10.<n>.0.2   Ray worker, 1 CPU
    worker-2  10.<n>.0.3   Ray worker, 1 CPU

Each namespace has its own loopback and one veth end on a bridge; no address on the bridge
belongs to the host, so traffic goes only between the namespaces this harness made. Every
process starts in its own session and stops by process group (never `ray stop`, which would
end every Ray process on the machine). ``down()`` undoes everything, and runs even when a test
fails; a harness whose owner died is swept away by the next one (names carry the owner's pid).

Needs root (``ip netns``), Debian's ``postgresql`` (its binaries, run as the ``postgres``
user) and psycopg2 (MLflow's PostgreSQL driver); ``skip_reason()`` says which is missing.
"""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "d3tc"  # every namespace, veth and bridge this harness makes starts with it
# Debian's PostgreSQL binaries (not on PATH): the newest installed major version.
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=Path("/usr/lib/postgresql/15/bin"),
             key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
RAY = str(Path(sys.executable).parent / "ray")  # the ray of the environment running the tests


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def skip_reason() -> str | None:
    """Why this machine cannot hold the cluster, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"{PREFIX}probe{os.getpid()}"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return "`ip netns add` is not permitted here"
    _ip("netns", "del", probe, check=False)
    if not (PG_BIN / "postgres").exists():
        return f"PostgreSQL is not installed ({PG_BIN}; Debian: apt-get install postgresql)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no `postgres` user to run PostgreSQL as"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install psycopg2-binary)"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> None:
    """Remove namespaces and links left by a harness whose process is gone (a killed test)."""
    owners = set()
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX) and "-" in name:
            owners.add(name[len(PREFIX):].split("-")[0])
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(PREFIX) and name[len(PREFIX):].split("-")[0].isdigit():
            owners.add(name[len(PREFIX):].split("-")[0])
    for owner in owners:
        if owner.isdigit() and not _pid_alive(int(owner)):
            _teardown_network(owner)


def _kill_namespace(ns: str) -> int:
    """SIGKILL every process in a network namespace at once; how many there were."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    return len(pids)


def _teardown_network(owner: str) -> None:
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(f"{PREFIX}{owner}-"):
            _kill_namespace(name)
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(f"{PREFIX}{owner}-") or name == f"{PREFIX}{owner}br":
            _ip("link", "del", name, check=False)


# ---------------------------------------------------------------------------------------------
# Processes: each in its own session, stopped by process group.


def _group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_group(proc: subprocess.Popen, first: int = signal.SIGTERM, grace: float = 15.0) -> None:
    """``first`` to the process group we started, then SIGKILL to what is left."""
    for sig, wait in ((first, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            if not _group_alive(proc.pid):
                break
            time.sleep(0.2)
        else:
            continue
        break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class Node:
    name: str  # head, worker-1, worker-2
    ns: str
    ip: str


@dataclass
class Cluster:
    """The running cluster: its nodes, the shared folder, the addresses a driver needs, and the
    processes it started (by role)."""

    root: Path  # the shared folder (what NFS would serve): storage, model cache, artifacts
    owner: str
    subnet: int
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    nodes: dict[str, Node] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    pg_port: int = 5432
    mlflow_port: int = 5000
    ray_port: int = 6379

    # -- addresses ---------------------------------------------------------------------------
    @property
    def head(self) -> Node:
        return self.nodes["head"]

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{self.ray_port}"

    @property
    def tracking_uri(self) -> str:
        """MLflow as the driver on the head sees it (the server listens on the head's
        loopback only)."""
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def database_uri(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.pg_port}/mlflow"

    def env(self, **extra: str) -> dict[str, str]:
        """A driver's environment: token auth on with this cluster's own token."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                   MLFLOW_TRACKING_URI=self.tracking_uri, PYTHONUNBUFFERED="1", **extra)
        return env

    # -- running things in a namespace --------------------------------------------------------
    def _cmd(self, node: str, cmd: list[str], user: str | None = None) -> list[str]:
        inner = ["runuser", "-u", user, "--", *cmd] if user else cmd
        return ["ip", "netns", "exec", self.nodes[node].ns, *inner]

    def run(self, node: str, cmd: list[str], env: dict[str, str] | None = None,
            timeout: float = 900, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """A command to its end inside ``node``'s namespace."""
        return subprocess.run(self._cmd(node, cmd), env=env or self.env(), cwd=cwd or self.root,
                              capture_output=True, text=True, timeout=timeout)

    def popen(self, role: str, node: str, cmd: list[str], env: dict[str, str] | None = None,
              user: str | None = None, cwd: Path | None = None) -> subprocess.Popen:
        """A long-lived process inside ``node``'s namespace, in its own session, logged to
        ``logs/<role>.log``."""
        log = self.root / "logs" / f"{role}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(self._cmd(node, cmd, user), env=env or self.env(),
                                    cwd=cwd or self.root, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[role] = proc
        return proc

    def log(self, role: str) -> str:
        path = self.root / "logs" / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, role: str, ready, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        proc = self.procs.get(role)
        while time.monotonic() < deadline:
            if ready():
                return
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"{role} did not come up (exit {proc.poll() if proc else None}):\n"
                           f"{self.log(role)[-3000:]}")

    def port_open(self, node: str, host: str, port: int) -> bool:
        code = f"import socket; socket.create_connection(({host!r}, {port}), 2).close()"
        return self.run(node, [sys.executable, "-c", code], timeout=30).returncode == 0

    # -- services ------------------------------------------------------------------------------
    def start_postgres(self) -> None:
        data = self.root / "pg" / "data"
        if not data.exists():
            data.parent.mkdir(parents=True)
            shutil.chown(data.parent, "postgres", "postgres")
            subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D",
                            str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                           check=True, capture_output=True)
        self.popen("postgres", "head", [str(PG_BIN / "postgres"), "-D", str(data), "-c",
                                        "listen_addresses=127.0.0.1", "-p", str(self.pg_port),
                                        "-k", str(data.parent)], user="postgres")
        self.wait_for("postgres", lambda: self.port_open("head", "127.0.0.1", self.pg_port))
        exists = self.run("head", [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p",
                                   str(self.pg_port), "-U", "postgres", "-tAc",
                                   "SELECT 1 FROM pg_database WHERE datname='mlflow'"])
        if exists.stdout.strip() != "1":
            made = self.run("head", [str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p",
                                     str(self.pg_port), "-U", "postgres", "mlflow"])
            assert made.returncode == 0, made.stderr

    def stop_postgres(self) -> None:
        if "postgres" in self.procs:  # SIGINT: PostgreSQL's fast shutdown
            stop_group(self.procs.pop("postgres"), first=signal.SIGINT)

    def start_mlflow(self) -> None:
        self.popen("mlflow", "head", [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.database_uri,
            "--artifacts-destination", (self.root / "mlflow-artifacts").as_uri(), "--host",
            "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1"])
        self.wait_for("mlflow", lambda: self._healthy(), timeout=240)

    def _healthy(self) -> bool:
        code = (f"import urllib.request; urllib.request.urlopen("
                f"'http://127.0.0.1:{self.mlflow_port}/health', timeout=3).read()")
        return self.run("head", [sys.executable, "-c", code], timeout=30).returncode == 0

    def stop_mlflow(self) -> None:
        if "mlflow" in self.procs:
            stop_group(self.procs.pop("mlflow"))

    def start_ray_head(self) -> None:
        self.popen("ray-head", "head", [
            RAY, "start", "--head", "--block", "--node-ip-address", self.head.ip, "--port",
            str(self.ray_port), "--num-cpus", "0", "--include-dashboard", "false",
            "--temp-dir", str(self.root / "ray" / "h"), "--disable-usage-stats"])
        self.wait_for("ray-head", lambda: "Ray runtime started" in self.log("ray-head"))

    def start_worker(self, name: str) -> None:
        self.popen(f"ray-{name}", name, [
            RAY, "start", "--block", "--address", self.address, "--node-ip-address",
            self.nodes[name].ip, "--num-cpus", "1", "--resources", json.dumps({name: 1}),
            # its own socket folder: the nodes share one file system (short: unix socket paths
            # are limited to 107 bytes)
            "--temp-dir", str(self.root / "ray" / name.replace("worker-", "w")),
            "--disable-usage-stats"],
            env=self.env(D3TUNE_CACHE_DIR=str(self.root / f"cache-{name}")))
        self.wait_for(f"ray-{name}", lambda: "Ray runtime started" in self.log(f"ray-{name}"))

    def kill_worker(self, name: str) -> None:
        """Every process of a worker node at once (SIGKILL): a machine lost mid-run. Killing
        the ``ray start`` process group is not enough: Ray's worker processes leave that group
        and, with their raylet gone, go on reporting to the driver for seconds."""
        assert _kill_namespace(self.nodes[name].ns) > 0, f"no process ran on {name}"
        stop_group(self.procs.pop(f"ray-{name}"), first=signal.SIGKILL, grace=5)

    def alive_nodes(self) -> list[str]:
        code = ("import ray, json; ray.init(address=%r, log_to_driver=False); "
                "print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() "
                "if n['Alive'])))" % self.address)
        done = self.run("head", [sys.executable, "-c", code], timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    # -- the whole thing ----------------------------------------------------------------------
    def down(self) -> None:
        """Stop every process (workers, head, MLflow, PostgreSQL), then the network."""
        for role in [r for r in list(self.procs) if r.startswith("ray-worker")] + [
                "ray-head", "mlflow"]:
            if role in self.procs:
                stop_group(self.procs.pop(role))
        self.stop_postgres()
        for role in list(self.procs):
            stop_group(self.procs.pop(role))
        _teardown_network(self.owner)


def up(root: Path, workers: int = 2) -> Cluster:
    """Make the network, start PostgreSQL, MLflow and Ray, and return the running cluster.
    On any failure what was started is taken down again before the error propagates."""
    sweep_stale()
    owner = str(os.getpid())
    subnet = 200 + (os.getpid() % 50)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # the postgres user walks into root/pg
    cluster = Cluster(root=root, owner=owner, subnet=subnet)
    try:
        bridge = f"{PREFIX}{owner}br"
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "set", bridge, "up")
        for i, name in enumerate(["head", *[f"worker-{k}" for k in range(1, workers + 1)]], 1):
            ns, ip = f"{PREFIX}{owner}-{i}", f"10.{subnet}.0.{i}"
            host_end, ns_end = f"{PREFIX}{owner}-{i}h", f"{PREFIX}{owner}-{i}n"
            _ip("netns", "add", ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", ns_end, "netns", ns)
            _ip("link", "set", host_end, "master", bridge)
            _ip("link", "set", host_end, "up")
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", ns_end)
            _ip("netns", "exec", ns, "ip", "link", "set", ns_end, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
            cluster.nodes[name] = Node(name, ns, ip)
        cluster.start_postgres()
        cluster.start_mlflow()
        cluster.start_ray_head()
        for name in cluster.nodes:
            if name != "head":
                cluster.start_worker(name)
        return cluster
    except BaseException:
        cluster.down()
        raise
