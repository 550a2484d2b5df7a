"""What caitlab asks SLURM, in one place: the queue (``squeue``: each job's state and why it
waits), the partitions and their nodes (``sinfo``), and cancelling jobs (``scancel``).

Stdlib only: ``caitlab-sweep`` imports it, and must not load torch, lightning or hydra. Each
query says when SLURM cannot answer (no client here, no controller) instead of guessing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from caitlab.record import RunRecord
from caitlab.status import LIVE

SQUEUE_CMD = ("squeue", "--noheader", "--format=%i|%T|%r", "--states=all", "--array")
SQUEUE_TIMEOUT_S = 5.0

# SLURM job states after which the job's processes are gone for good (squeue keeps such jobs
# for MinJobAge seconds). Every other state (PENDING, RUNNING, COMPLETING, SUSPENDED,
# REQUEUED, CONFIGURING...) means the job may still write its run folder.
SLURM_ENDED = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT",
})
# Job states of a job waiting to (re)start.
SLURM_QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
                          "SPECIAL_EXIT"})

# Pending reasons that no amount of waiting resolves, and the keys that change the request.
# (``...Limit`` reasons, QOSMaxCpuPerJobLimit and the like, are limits on what runs at once:
# the job waits its turn.)
NEVER_STARTS = {
    "PartitionConfig": "the partition cannot take this request: change cluster.partition, or "
                       "ask less (cluster.cpus_per_task, cluster.mem_gb, trainer.devices)",
    "ReqNodeNotAvail": "the nodes it needs are down, drained or reserved: change "
                       "cluster.partition (or cluster.constraint)",
    "BadConstraints": "no node has these features: change cluster.constraint",
    "InvalidAccount": "SLURM does not know this account: change cluster.account",
    "InvalidQOS": "SLURM does not know this QOS, or it is not yours: change cluster.qos",
    "PartitionDown": "the partition is down: change cluster.partition",
    "PartitionInactive": "the partition is inactive: change cluster.partition",
}


class SqueueUnavailable(RuntimeError):
    """squeue is not installed, did not answer in time, or failed."""


@dataclass
class Queue:
    """What squeue says: each job's state, and why each waiting job waits."""

    states: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # jobs waiting to (re)start only

    def reason(self, job: str | None) -> str | None:
        return self.reasons.get(job) if job else None


def never_starts(reason: str | None) -> str | None:
    """The line naming what to change, where a job waiting for ``reason`` can never start."""
    if not reason:
        return None
    return NEVER_STARTS.get(reason.split(",")[0].strip())


def upstream_failed(reason: str | None) -> bool:
    """A job waiting for a job that ended without success (a stage whose upstream failed)."""
    return reason is not None and reason.split(",")[0].strip() == "DependencyNeverSatisfied"


def parse_squeue(text: str) -> Queue:
    """``id|STATE|reason`` lines -> the Queue; array tasks appear as ``1234_5``."""
    queue = Queue()
    for line in text.splitlines():
        job, sep, rest = line.strip().partition("|")
        if not (sep and job):
            continue
        state, _, reason = rest.partition("|")
        job, state = job.strip(), state.strip().upper()
        queue.states[job] = state
        if state in SLURM_QUEUED and reason.strip() not in ("", "None"):
            queue.reasons[job] = reason.strip()
    return queue


def _run(cmd: list[str] | tuple[str, ...], timeout: float) -> str:
    """``cmd``'s stdout; raises SqueueUnavailable saying why there is none."""
    if shutil.which(cmd[0]) is None:
        raise SqueueUnavailable(f"{cmd[0]} not found on PATH")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SqueueUnavailable(f"no answer in {timeout:g}s") from None
    except OSError as err:
        raise SqueueUnavailable(str(err)) from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise SqueueUnavailable(lines[-1] if lines else f"exit code {proc.returncode}")
    return proc.stdout


def query_queue(timeout: float = SQUEUE_TIMEOUT_S) -> Queue:
    """Every job squeue knows (one ``squeue`` call); raises SqueueUnavailable with the reason."""
    return parse_squeue(_run(SQUEUE_CMD, timeout))


def query_squeue(timeout: float = SQUEUE_TIMEOUT_S) -> dict[str, str]:
    """{job id: state} of every job squeue knows; raises SqueueUnavailable."""
    return query_queue(timeout).states


def squeue_states(timeout: float = SQUEUE_TIMEOUT_S) -> dict[str, str] | None:
    """Like query_squeue, but None when squeue is unavailable (never raises for that)."""
    try:
        return query_squeue(timeout)
    except SqueueUnavailable:
        return None


def is_live(state: str | None) -> bool:
    """Whether a job in ``state`` (None: not listed) may still start or write."""
    return state is not None and state not in SLURM_ENDED


def cancel(job_ids: list[str], timeout: float = 30.0) -> None:
    """``scancel`` of the jobs (array tasks as ``1234_5``); raises SqueueUnavailable."""
    if job_ids:
        _run(["scancel", *job_ids], timeout)


# --- partitions and their nodes ---------------------------------------------------------------

def slurm_partitions() -> tuple[list[str], str | None] | None:
    """The cluster's partitions and its default one (``sinfo`` marks it with ``*``); None
    when ``sinfo`` cannot say (no SLURM client here: submitit's own error will tell)."""
    try:
        out = _run(["sinfo", "--all", "--noheader", "--format=%P"], 30)
    except SqueueUnavailable:
        return None
    names = out.split()
    if not names:
        return None
    default = next((n.rstrip("*") for n in names if n.endswith("*")), None)
    return list(dict.fromkeys(n.rstrip("*") for n in names)), default


@dataclass
class Node:
    cpus: int
    mem_mb: int
    gpus: int


def gres_gpus(gres: str) -> int:
    """GPUs in a node's ``Gres`` (``gpu:4``, ``gpu:a100:2(S:0-1),gpu:v100:2``, ``(null)``)."""
    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def partition_nodes(partitions: str) -> list[Node] | None:
    """The nodes of ``partitions`` (comma-separated) as ``sinfo`` lists them; None when it
    cannot say."""
    cmd = ["sinfo", "--noheader", "--Node", f"--partition={partitions}",
           "--format=%c|%m|%G"]
    try:
        out = _run(cmd, 30)
    except SqueueUnavailable:
        return None
    nodes = []
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0].rstrip("+").isdigit():
            mem = parts[1].rstrip("+")
            nodes.append(Node(int(parts[0].rstrip("+")), int(mem) if mem.isdigit() else 0,
                              gres_gpus(parts[2])))
    return nodes or None


def _fit(key: str, asked: int, most: int, unit: str, where: str, tasks: int = 1) -> str | None:
    """The refusal of ``key`` asking ``asked`` per task (``tasks`` a node: trainer.devices)
    where the nodes have at most ``most``; None where it fits."""
    if asked * tasks <= most:
        return None
    what = f"{key}={asked}" + (f" x trainer.devices={tasks} tasks" if tasks > 1 else "")
    have = f"at most {most} {unit}" if most else f"no {unit}"
    if most // tasks:
        fix = f"set {key}={most // tasks} or lower"
    elif most:  # not even one each: fewer tasks a node
        fix = f"set trainer.devices={most} or lower with {key}=1"
    else:
        fix = "use another cluster.partition"
    return f"{what}: {where} nodes have {have}; {fix}"


def request_refusal(params: dict[str, Any], partition: str) -> str | None:
    """Why no node of ``partition`` can ever run a job asking the launcher's ``params``
    (per node: cpus_per_task x tasks_per_node CPUs, mem_gb, gpus_per_node), naming the key
    and what the partition offers; None when one can, or when sinfo cannot say."""
    nodes = partition_nodes(partition)
    if nodes is None:
        return None
    where = f"partition {partition}'s"
    tasks = int(params.get("tasks_per_node") or 1)
    cpus, mem, gpus = (params.get(k) for k in ("cpus_per_task", "mem_gb", "gpus_per_node"))
    refusals = [
        cpus and _fit("cluster.cpus_per_task", int(cpus), max(n.cpus for n in nodes), "CPUs",
                      where, tasks),
        mem and _fit("cluster.mem_gb", int(mem), max(n.mem_mb for n in nodes) // 1024,
                     "GB of memory", where),
        gpus and _fit("trainer.devices", int(gpus), max(n.gpus for n in nodes), "GPUs", where),
    ]
    found = next((r for r in refusals if r), None)
    if found is None and not any(
            (not cpus or int(cpus) * tasks <= n.cpus) and (not mem or int(mem) * 1024 <= n.mem_mb)
            and (not gpus or int(gpus) <= n.gpus) for n in nodes):
        return (f"no node of partition {partition} has cluster.cpus_per_task={cpus} x {tasks} "
                f"CPUs, cluster.mem_gb={mem} GB and {gpus or 0} GPUs at once; ask less")
    return found


# --- steering ---------------------------------------------------------------------------------

def live_job(summary: dict[str, Any], queue: Queue) -> str | None:
    """The run's SLURM job where it is still queued or running, else None."""
    job = summary.get("slurm_job_id")
    if summary.get("status") not in LIVE or job in (None, ""):
        return None
    return str(job) if is_live(queue.states.get(str(job))) else None


def cancel_runs(runs: list[tuple[Any, dict[str, Any]]], queue: Queue,
                wait_s: float = 60.0) -> list[tuple[Any, str]]:
    """``scancel`` of the live jobs of ``runs`` ((run folder, summary) pairs), then, once
    they have ended, ``status: cancelled`` in each one's summary.json; the (folder, job)
    pairs cancelled. It waits for the jobs to end (at most ``wait_s``): a running job writes
    ``interrupted`` as it stops at SLURM's SIGTERM, which must not be the last word."""
    live = [(folder, job) for folder, summary in runs if (job := live_job(summary, queue))]
    cancel([job for _, job in live])
    deadline = time.monotonic() + wait_s
    while live and time.monotonic() < deadline:
        try:
            states = query_squeue()
        except SqueueUnavailable:
            break
        if not any(is_live(states.get(job)) for _, job in live):
            break
        time.sleep(1)
    for folder, _ in live:
        RunRecord(folder).cancel()
    return live
