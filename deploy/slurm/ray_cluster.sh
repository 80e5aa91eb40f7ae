#!/usr/bin/env bash
# One Ray node of a SLURM job, run by d3tune.sbatch through srun (one task per node):
#   ray_cluster.sh head JOBDIR      the allocation's first node: Ray head, writes JOBDIR/ray/head_address
#   ray_cluster.sh worker JOBDIR    any other node: joins the address the head wrote
#   ray_cluster.sh resources        print the `ray start` resource flags this node would get
#
# Why a helper: srun runs it on each node, so each node reads its *own* SLURM variables
# (SLURM_CPUS_ON_NODE, SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES differ per node), and each node
# stops its own Ray when the step ends: `ray stop` would end every Ray on the machine, other
# jobs' included, so the helper keeps Ray in a session of its own and ends only that session.
#
# Token auth stays on: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (a 0600 file in JOBDIR, on
# storage every node sees) come from d3tune.sbatch through srun's environment.
# Optional environment: D3TUNE_NODE_CPUS / D3TUNE_NODE_GPUS (override SLURM's counts),
# D3TUNE_RAY_HEAD_IP (the head's --node-ip-address; default: Ray's choice), D3TUNE_RAY_PORT
# (the head's GCS port; default 20000 + job id % 20000),
# D3TUNE_RAY_OBJECT_STORE_MB (default: a quarter of SLURM_MEM_PER_NODE when set, else Ray's),
# D3TUNE_RAY_TMP (node-local root of Ray's temp folder, default /tmp; keep it short: Ray's
# socket paths must stay under 107 characters).
set -euo pipefail

die() { echo "ray_cluster.sh: $*" >&2; exit 2; }

node_cpus() {
  if [ -n "${D3TUNE_NODE_CPUS:-}" ]; then echo "$D3TUNE_NODE_CPUS"
  elif [ -n "${SLURM_CPUS_ON_NODE:-}" ]; then echo "$SLURM_CPUS_ON_NODE"
  else nproc
  fi
}

# GPUs the job holds on this node. Always passed explicitly: on a cluster without cgroup device
# limits Ray would otherwise count every GPU of the machine, other jobs' included.
node_gpus() {
  local v="${CUDA_VISIBLE_DEVICES:-}"
  if [ -n "${D3TUNE_NODE_GPUS:-}" ]; then echo "$D3TUNE_NODE_GPUS"
  elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"
  elif [ -n "$v" ] && [ "$v" != "NoDevFiles" ]; then awk -F, '{print NF}' <<< "$v"
  else echo 0
  fi
}

resource_flags() {
  local flags=(--num-cpus "$(node_cpus)" --num-gpus "$(node_gpus)")
  local mb="${D3TUNE_RAY_OBJECT_STORE_MB:-}"
  if [ -z "$mb" ] && [ -n "${SLURM_MEM_PER_NODE:-}" ]; then mb=$(( SLURM_MEM_PER_NODE / 4 )); fi
  if [ -n "$mb" ]; then flags+=(--object-store-memory "$(( mb * 1024 * 1024 ))"); fi
  echo "${flags[@]}"
}

# Ray's processes on this node: those in session $SID (fields after "pid (comm) ": state, ppid,
# pgrp, session). Zombies do not count: nothing may reap them in a container.
session_pids() {
  local stat rest pid
  for stat in /proc/[0-9]*/stat; do
    rest=$(cat "$stat" 2> /dev/null) || continue
    pid=${rest%% *}
    rest=${rest##*) }
    # shellcheck disable=SC2086
    set -- $rest
    if [ "$4" = "$SID" ] && [ "$1" != Z ]; then echo "$pid"; fi
  done
}

stop_node() {  # $1: exit status
  trap - TERM INT HUP
  if [ -n "${SID:-}" ]; then
    kill -TERM "$SID" 2> /dev/null || true  # `ray start --block` drains, then stops its processes
    for _ in $(seq 60); do [ -z "$(session_pids)" ] && break; sleep 0.5; done
    if [ -n "$(session_pids)" ]; then
      echo "ray_cluster.sh: $(hostname -s): Ray did not stop within 30 s; killing its session" >&2
      # shellcheck disable=SC2046
      kill -KILL $(session_pids) 2> /dev/null || true
    fi
  fi
  rm -rf "$TMP_ROOT"
  exit "${1:-0}"
}

run_node() {
  local role=$1 jobdir=$2 host log address="" tries
  host=$(hostname -s)
  [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job (SLURM_JOB_ID is unset)"
  [ "${RAY_AUTH_MODE:-}" = token ] || die "RAY_AUTH_MODE must be token (d3tune.sbatch sets it)"
  [ -r "${RAY_AUTH_TOKEN_PATH:-}" ] || die "RAY_AUTH_TOKEN_PATH: no readable token file"
  command -v ray > /dev/null || die "no 'ray' on PATH on $host (activate d3tune's environment)"
  TMP_ROOT="${D3TUNE_RAY_TMP:-/tmp}/d3t-ray-$SLURM_JOB_ID"
  rm -rf "$TMP_ROOT"  # a previous attempt of this job (requeue) may have left it
  mkdir -p "$jobdir/ray/logs"
  log="$jobdir/ray/logs/$role-$host.log"
  # shellcheck disable=SC2207
  local args=($(resource_flags) --temp-dir "$TMP_ROOT" --disable-usage-stats --block)
  if [ "$role" = head ]; then
    # The GCS port: from the job id unless given, so two jobs sharing a node do not collide.
    args+=(--head --port "${D3TUNE_RAY_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"
           --include-dashboard=false)
    [ -n "${D3TUNE_RAY_HEAD_IP:-}" ] && args+=(--node-ip-address "$D3TUNE_RAY_HEAD_IP")
  else
    for tries in $(seq 360); do
      [ -s "$jobdir/ray/head_address" ] && break
      sleep 0.5
    done
    address=$(cat "$jobdir/ray/head_address" 2> /dev/null) || die "no head address after 180 s"
    args+=(--address "$address")
  fi
  SID=""
  trap 'stop_node 0' TERM INT HUP
  # Its own session: every Ray process of this node (raylet, GCS, trial workers) stays in it.
  # No drain on SIGTERM (Ray's default waits up to 30 s, for Serve): a job's node is going away
  # and SLURM's KillWait (often 30 s) is all the time there is.
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0} \
    setsid ray start "${args[@]}" > "$log" 2>&1 < /dev/null &
  SID=$!
  for tries in $(seq 360); do
    grep -q "Ray runtime started" "$log" 2> /dev/null && break
    kill -0 "$SID" 2> /dev/null || break
    sleep 0.5
  done
  if ! grep -q "Ray runtime started" "$log" 2> /dev/null; then
    echo "ray_cluster.sh: $role on $host: Ray did not start (log: $log)" >&2
    stop_node 1
  fi
  if [ "$role" = head ]; then
    cat "$TMP_ROOT/ray_current_cluster" > "$jobdir/ray/head_address.tmp"
    mv "$jobdir/ray/head_address.tmp" "$jobdir/ray/head_address"
  fi
  echo "$role $host $(resource_flags)" > "$jobdir/ray/ready-$role-$host"
  # Until d3tune.sbatch writes JOBDIR/ray/stop (the normal end) or a signal arrives (scancel,
  # preemption: SLURM signals every process of the job; the trap runs after this second's sleep).
  while kill -0 "$SID" 2> /dev/null && [ ! -e "$jobdir/ray/stop" ]; do sleep 1; done
  stop_node 0
}

case "${1:-}" in
  head|worker) [ $# -eq 2 ] || die "usage: ray_cluster.sh head|worker JOBDIR"; run_node "$1" "$2" ;;
  resources) resource_flags ;;
  *) die "usage: ray_cluster.sh head|worker JOBDIR | resources" ;;
esac
