"""deploy/slurm/d3tune.sbatch under a real SLURM started on this machine.

The slow tests start a single-node SLURM 22.05 (Debian's slurm-wlm and munge; `.ci/run` installs
them) with every file in a temp folder: its own munge key and socket, its own ports, its own
state, spool, log and pid files (VERIFIED.md, "SLURM on this kind of machine"). The daemons are
stopped by their pid files in a `finally`. Jobs run as the test's user, so the Ray nodes a job
starts are checked to be gone afterwards through /proc (every process a job starts carries its
SLURM_JOB_ID in its environment). Nothing here calls `ray stop`.

The default-suite tests are cheap: the script run outside an allocation, its argument checks,
and the helper's reading of SLURM's per-node CPU/GPU variables.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import socket
import sqlite3
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = REPO / "deploy" / "slurm" / "d3tune.sbatch"
HELPER = REPO / "deploy" / "slurm" / "ray_cluster.sh"
SBIN = ("/usr/sbin", "/usr/bin", "/sbin")


def _env_without_slurm() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


# ---------------------------------------------------------------------------------------------
# Default suite: cheap checks of the scripts themselves


def test_outside_an_allocation_one_clear_line_and_nonzero_exit(tmp_path):
    done = subprocess.run(["bash", str(SBATCH_SCRIPT), "sweep", "search_spaces/d3_default.yaml"],
                          env=_env_without_slurm(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1, done.stderr
    assert "not inside a SLURM allocation" in err[0] and "sbatch" in err[0]
    assert done.stdout == ""
    assert not list(tmp_path.iterdir())  # nothing created


@pytest.mark.parametrize("args, field", [
    ([], "usage"),
    (["sweep"], "usage"),
    (["report", "x.yaml"], "COMMAND"),
    (["sweep", "x.yaml", "--resume"], "--resume"),
    (["sweep", "x.yaml", "--storage=/x"], "--storage"),
    (["sweep", "missing.yaml"], "SPEC"),
])
def test_bad_arguments_inside_a_job_one_line(tmp_path, args, field):
    env = {**_env_without_slurm(), "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1",
           "SLURM_SUBMIT_DIR": str(tmp_path)}
    done = subprocess.run(["bash", str(SBATCH_SCRIPT), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and field in err[0], done.stderr


@pytest.mark.parametrize("env, flags", [
    ({"SLURM_CPUS_ON_NODE": "8", "SLURM_GPUS_ON_NODE": "2"}, "--num-cpus 8 --num-gpus 2"),
    ({"SLURM_CPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "1,3,5"}, "--num-cpus 4 --num-gpus 3"),
    ({"SLURM_CPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "--num-cpus 4 --num-gpus 0"),
    ({"SLURM_CPUS_ON_NODE": "16", "SLURM_MEM_PER_NODE": "4000"},
     f"--num-cpus 16 --num-gpus 0 --object-store-memory {1000 * 2**20}"),
    ({"SLURM_CPUS_ON_NODE": "16", "D3TUNE_NODE_CPUS": "12", "D3TUNE_NODE_GPUS": "1"},
     "--num-cpus 12 --num-gpus 1"),
])
def test_each_node_takes_its_resources_from_slurm(env, flags):
    base = {k: v for k, v in _env_without_slurm().items()
            if k not in ("CUDA_VISIBLE_DEVICES", "D3TUNE_NODE_CPUS", "D3TUNE_NODE_GPUS",
                         "D3TUNE_RAY_OBJECT_STORE_MB")}
    done = subprocess.run(["bash", str(HELPER), "resources"], env={**base, **env},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == flags


# ---------------------------------------------------------------------------------------------
# A real single-node SLURM on this machine


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_pidfile(pidfile: Path, timeout: float = 15.0) -> None:
    """SIGTERM the daemon named by its pid file, SIGKILL it if it lingers."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait(what: str, ready, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{what} within {timeout:.0f} s\n{tail}")


class Slurm:
    """Client side of the test's SLURM: commands with SLURM_CONF pointing at its config."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        done = subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], env=kw.pop("env", self.env),
                              capture_output=True, text=True, timeout=60, **kw)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: exit {done.returncode}\n{done.stderr}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _slurm_conf(folder: Path, host: str, cpus: int) -> str:
    return textwrap.dedent(f"""\
        ClusterName=d3tunetest
        SlurmctldHost={host}
        SlurmctldPort={_free_port()}
        SlurmdPort={_free_port()}
        SlurmUser=root
        SlurmdUser=root
        AuthType=auth/munge
        AuthInfo=socket={folder}/munge/munge.socket
        CredType=cred/munge
        ProctrackType=proctrack/linuxproc
        TaskPlugin=task/none
        JobAcctGatherType=jobacct_gather/none
        AccountingStorageType=accounting_storage/none
        JobCompType=jobcomp/none
        SelectType=select/cons_tres
        SelectTypeParameters=CR_Core
        MpiDefault=none
        ReturnToService=2
        KillWait=20
        MinJobAge=3600
        StateSaveLocation={folder}/state
        SlurmdSpoolDir={folder}/spool
        SlurmctldPidFile={folder}/slurmctld.pid
        SlurmdPidFile={folder}/slurmd.pid
        SlurmctldLogFile={folder}/slurmctld.log
        SlurmdLogFile={folder}/slurmd.log
        NodeName={host} CPUs={cpus} RealMemory=2000 State=UNKNOWN
        PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
        """)


@pytest.fixture(scope="module")
def slurm():
    """munged, slurmctld and slurmd of this test only; stopped by their pid files."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun")
               if _which(b) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): "
                    "apt-get install slurm-wlm munge (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("the test's SLURM runs its daemons as root (SlurmUser=root)")
    folder = Path(tempfile.mkdtemp(prefix="d3tslurm-", dir="/tmp"))
    host = socket.gethostname().split(".")[0]
    pidfiles = [folder / "slurmd.pid", folder / "slurmctld.pid", folder / "munge" / "munged.pid"]
    for sub in ("munge", "state", "spool"):
        (folder / sub).mkdir(mode=0o700)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = folder / "slurm.conf"
    conf.write_text(_slurm_conf(folder, host, os.cpu_count() or 1))
    env = {**_env_without_slurm(), "SLURM_CONF": str(conf)}
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN])
    client = Slurm(folder, env)
    try:
        client.run("munged", "--force", f"--key-file={key}",
                   f"--socket={folder}/munge/munge.socket",
                   f"--pid-file={folder}/munge/munged.pid", f"--log-file={folder}/munge/munged.log",
                   f"--seed-file={folder}/munge/munged.seed")
        client.run("slurmctld", "-f", str(conf))
        client.run("slurmd", "-f", str(conf), "-N", host)
        _wait("the node did not become idle",
              lambda: "idle" in client.run("sinfo", "-h", "-o", "%t", check=False).stdout,
              60, folder / "slurmctld.log")
        yield client
    finally:
        if (folder / "slurmctld.pid").exists():
            subprocess.run([_which("scancel") or "scancel", "--full", "-u", "root"], env=env,
                           capture_output=True, timeout=60)
        for pidfile in pidfiles:
            _stop_pidfile(pidfile)
        shutil.rmtree(folder, ignore_errors=True)


SPEC = """\
name: {name}
experiment: {name}
base:
  data: {{name: digits}}
  attack: {{name: badnets}}
  train: {{epochs: 2}}
  defense: {{name: d3, epochs: {epochs}}}
  eval: {{subset: 100, every: 1}}  # every epoch: the tests count per-epoch steps
space:
  defense.lr: {{loguniform: [0.005, 0.05]}}
num_samples: 4
metric: der
mode: max
scheduler: {{name: none}}
resources: {{cpu: 1}}
max_concurrent: {concurrent}
checkpoint_every_s: 0
"""


def _job_processes(job_id: str) -> list[str]:
    """Live processes whose environment says they belong to SLURM job ``job_id``."""
    found = []
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        pid = env_file.parent.name
        try:
            if f"SLURM_JOB_ID={job_id}".encode() not in env_file.read_bytes().split(b"\0"):
                continue
            if not _alive(int(pid)):
                continue
            cmd = (env_file.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        found.append(f"{pid} {cmd[:120]}")
    return found


def _mlflow_runs(db: Path, experiment: str) -> tuple[list[dict], list[dict]]:
    """(parents, children) of an experiment, read with sqlite3 (cheap, read-only): each run's
    id, status, d3tune.trial_id tag and number of metric values."""
    if not db.exists():
        return [], []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        rows = con.execute(
            "SELECT r.run_uuid, r.status, p.value, t.value, "
            "  (SELECT COUNT(*) FROM metrics m WHERE m.run_uuid = r.run_uuid) "
            "FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
            "LEFT JOIN tags p ON p.run_uuid = r.run_uuid AND p.key = 'mlflow.parentRunId' "
            "LEFT JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'd3tune.trial_id' "
            "WHERE e.name = ? AND r.lifecycle_stage = 'active'", (experiment,)).fetchall()
    runs = [dict(id=r[0], status=r[1], parent=r[2], trial=r[3], metrics=r[4]) for r in rows]
    return [r for r in runs if r["parent"] is None], [r for r in runs if r["parent"] is not None]


def _metric_steps_logged_twice(db: Path) -> list[tuple]:
    """(run, metric, step) logged more than once: a resumed trial must not repeat epochs."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        return con.execute("SELECT run_uuid, key, step, COUNT(*) FROM metrics "
                           "GROUP BY run_uuid, key, step HAVING COUNT(*) > 1").fetchall()


def _finished_children(db: Path, experiment: str) -> int:
    try:
        return sum(r["status"] == "FINISHED" for r in _mlflow_runs(db, experiment)[1])
    except sqlite3.Error:  # the driver is creating the store
        return 0


def _in_flight(db: Path, experiment: str) -> bool:
    """At least one child run finished and another one running with metrics logged."""
    try:
        children = _mlflow_runs(db, experiment)[1]
    except sqlite3.Error:
        return False
    return (any(r["status"] == "FINISHED" for r in children)
            and any(r["status"] == "RUNNING" and r["metrics"] for r in children))


def _tune_trials(exp_dir: Path) -> set[str]:
    """Trial ids (folder names) with results in Tune's experiment folder."""
    return {p.parent.name for p in exp_dir.glob("*/result.json") if p.stat().st_size}


def _submit(slurm: Slurm, work: Path, spec: Path) -> str:
    env = {**slurm.env, "D3TUNE_SHARED": str(work / "shared"), "D3TUNE_RAY_PORT": str(_free_port()),
           "PYTHONPATH": str(REPO), "MLFLOW_LOGGING_LEVEL": "WARNING"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("D3TUNE_CACHE_DIR", None)
    out = slurm.run("sbatch", "--parsable", "--nodes=1", f"--cpus-per-task={os.cpu_count() or 1}",
                    f"--output={work}/job-%j.out", f"--chdir={work}", str(SBATCH_SCRIPT),
                    "sweep", str(spec), env=env, cwd=work).stdout
    return out.strip().split(";")[0]


def _wait_job(slurm: Slurm, job_id: str, work: Path, timeout: float) -> dict[str, str]:
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    _wait(f"job {job_id} did not end", lambda: slurm.job(job_id)["JobState"] in final, timeout,
          work / f"job-{job_id}.out")
    return slurm.job(job_id)


def _check_ray_gone(job_id: str) -> None:
    left: list[str] = []

    def gone() -> bool:
        left[:] = _job_processes(job_id)
        return not left

    try:
        _wait("processes of the job were left", gone, 30)
    except AssertionError:
        raise AssertionError(f"job {job_id} left processes: {left}") from None
    assert not any(("raylet" in p or "gcs_server" in p) for p in _job_processes(job_id))


@pytest.mark.slow
def test_sbatch_runs_a_sweep_on_a_ray_cluster_and_stops_it(slurm, tmp_path):
    spec = tmp_path / "slurmsweep.yaml"
    spec.write_text(SPEC.format(name="slurmsweep", epochs=2, concurrent=2))
    t0 = time.monotonic()
    job_id = _submit(slurm, tmp_path, spec)
    job = _wait_job(slurm, job_id, tmp_path, 900)
    wall = time.monotonic() - t0
    log = (tmp_path / f"job-{job_id}.out").read_text(errors="replace")
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-4000:]
    parents, children = _mlflow_runs(tmp_path / "shared" / "mlflow.db", "slurmsweep")
    assert len(parents) == 1 and len(children) == 4, log[-4000:]
    assert all(r["status"] == "FINISHED" for r in parents + children)
    assert {r["trial"] for r in children} == _tune_trials(tmp_path / "shared" / "runs" / "slurmsweep")
    assert not _metric_steps_logged_twice(tmp_path / "shared" / "mlflow.db")
    assert (tmp_path / "shared" / "runs" / "slurmsweep" / "tuner.pkl").exists()
    assert "--resume" not in log and "Ray stopped on" in log
    token = tmp_path / "shared" / "jobs" / job_id / "ray_auth_token"
    assert token.stat().st_mode & 0o077 == 0  # the job's user only
    assert token.read_text().strip() not in log  # the token never reaches the output
    _check_ray_gone(job_id)
    print(f"\nsbatch sweep (4 trials, 1 node): {wall:.1f} s from sbatch to COMPLETED")


@pytest.mark.slow
def test_requeued_job_resumes_and_logs_each_trial_once(slurm, tmp_path):
    spec = tmp_path / "requeued.yaml"
    spec.write_text(SPEC.format(name="requeued", epochs=5, concurrent=1))
    db = tmp_path / "shared" / "mlflow.db"
    job_id = _submit(slurm, tmp_path, spec)
    out = tmp_path / f"job-{job_id}.out"
    # Preempt mid-sweep and mid-trial: one trial finished, the next one has logged an epoch
    # (so it has a checkpoint to continue from).
    _wait("no trial got in flight after a finished one", lambda: _in_flight(db, "requeued"), 600,
          out)
    done_before = _finished_children(db, "requeued")
    assert done_before < 4, "the sweep ended before the requeue: make the trials longer"
    slurm.run("scontrol", "requeue", job_id)
    t_requeue = time.monotonic()
    # The first attempt ends (SIGTERM to the script, the driver and Ray), the job runs again.
    _wait("the job was not requeued", lambda: slurm.job(job_id).get("Restarts", "0") != "0"
          and slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING"), 120, out)
    job = slurm.job(job_id)
    if job["JobState"] == "PENDING":
        # slurmctld holds a requeued batch job back (Reason=BeginTime, eligible 121 s after the
        # requeue): make it eligible now, to keep the test short. What runs then is what would
        # run two minutes later.
        print(f"\nrequeued job pending: Reason {job.get('Reason')}, "
              f"EligibleTime {job.get('EligibleTime')}")
        slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
    job = _wait_job(slurm, job_id, tmp_path, 900)
    wall = time.monotonic() - t_requeue
    log = out.read_text(errors="replace")
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-4000:]
    assert "received SIGTERM" in log and "attempt 2" in log, log[-4000:]
    assert log.count("--resume") == 1 and "Ray stopped on" in log, log[-4000:]
    parents, children = _mlflow_runs(db, "requeued")
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED", parents
    finished = [r for r in children if r["status"] == "FINISHED"]
    # Exactly 4 finished child runs, one per trial of Tune's experiment: none lost, none twice.
    assert len(finished) == 4, children
    assert {r["trial"] for r in finished} == _tune_trials(tmp_path / "shared" / "runs" / "requeued")
    # No other child: a trial started in the instant before the driver died and missing from
    # Tune's last snapshot is handed to the resumed run, which reuses its child (issue 22).
    others = [r for r in children if r["status"] != "FINISHED"]
    assert len(children) == 4, children
    assert not _metric_steps_logged_twice(db)
    _check_ray_gone(job_id)
    print(f"\nrequeue after {done_before} finished trial(s): {len(finished)} finished child runs "
          f"(+{len(others)} orphan KILLED), {wall:.1f} s from requeue to COMPLETED")


# ---------------------------------------------------------------------------------------------
# The helper's multi-node path, on one machine (this SLURM has one node)


@pytest.mark.slow
def test_helper_head_and_worker_join_with_token_auth_and_stop_on_the_stop_file(tmp_path):
    """What `srun ... ray_cluster.sh worker` does on a second node: read the head's address
    from the job folder and join with the job's token; the stop file ends both nodes."""
    job_id = str(900000 + os.getpid() % 90000)
    jobdir = tmp_path / "job"
    jobdir.mkdir()
    token = jobdir / "ray_auth_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    env = {**_env_without_slurm(), "SLURM_JOB_ID": job_id, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), "D3TUNE_RAY_PORT": str(_free_port()),
           "D3TUNE_NODE_CPUS": "1", "D3TUNE_RAY_OBJECT_STORE_MB": "100"}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    procs, roots = [], []
    try:
        for role in ("head", "worker"):  # two Ray nodes on one machine: two temp folders
            roots.append(tempfile.mkdtemp(prefix=f"d3t{role[0]}-", dir="/tmp"))  # short paths
            node_env = {**env, "D3TUNE_RAY_TMP": roots[-1]}
            procs.append(subprocess.Popen(["bash", str(HELPER), role, str(jobdir)], env=node_env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          start_new_session=True))
            _wait(f"the {role} did not start", lambda r=role: any(
                (jobdir / "ray").glob(f"ready-{r}-*")), 180,
                jobdir / "ray" / "logs" / f"{role}-{socket.gethostname().split('.')[0]}.log")
        address = (jobdir / "ray" / "head_address").read_text().strip()
        probe = ("import ray; ray.init(address='%s', logging_level='ERROR'); "
                 "print(sum(n['Alive'] for n in ray.nodes()))" % address)
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "2", done.stderr
        (jobdir / "ray" / "stop").touch()
        for proc in procs:
            assert proc.wait(timeout=90) == 0, proc.stderr.read()
        _check_ray_gone(job_id)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
