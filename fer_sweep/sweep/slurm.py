"""SLURM through Hydra's submitit launcher, fitted to fer_sweep (``hydra/launcher=slurm``).

Hydra's SlurmLauncher submits one array job per sweep and waits for it; three things it does not
do are done here (and by its subclass ``hydra_plugins.fer_sweep_plugin.submitit_launcher``, in
the package where Hydra requires launchers to live):

- **check before submitting** (``check_cluster``, called by the sweep's parent-run callback): a
  partition that does not exist, GPUs asked of a partition without any, more CPUs or memory per
  job than its nodes have — jobs that could never start, which SLURM would keep PENDING forever
  — stop the sweep at once with one message that names the setting to change;
- **follow jobs without accounting**: without slurmdbd, ``sacct`` fails on every poll (and
  submitit warns each time, dozens of lines per sweep); ``SlurmLauncher`` then follows the jobs
  with ``squeue`` instead, and says so once (``quiet_polling``);
- **preemption and time limits continue the same MLflow run**: a job stopped by the scheduler
  (``scontrol requeue``, preemption, SIGTERM or submitit's SIGUSR2 before the time limit) ends
  its training loop at a safe step (``fer_sweep.core.interrupt``); if SLURM requeued it, or if it
  may requeue itself (``hydra.launcher.max_num_timeout`` not used up), it comes back and continues
  the run it had started, from that run's checkpoint (``trainer.resume=<run id>``); otherwise
  it is recorded as a failed job of the sweep and the others go on.

Job ids are recorded on every run as the tag ``fer_sweep.slurm_job_id`` (``tracking``).
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fer_sweep.core.interrupt import job_signals
from fer_sweep.errors import FerSweepError

log = logging.getLogger(__name__)

JOB_TAG = "fer_sweep.slurm_job_id"


# ---------------------------------------------------------------------------------------------
# Inside a job


def job_id() -> str | None:
    """The SLURM job this process runs in, as squeue shows it (``<array job>_<task>`` for a
    task of an array job: the id a requeued job keeps)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def restarts() -> int:
    """How many times SLURM has requeued this job so far."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _ignore_term() -> None:
    """In scontrol's process: a requeue signals every process of the job, scontrol too; let
    it answer first."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _scontrol_job(jid: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", jid],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_ignore_term,
    ).stdout
    return dict(w.split("=", 1) for w in out.split() if "=" in w)


def after_interruption(max_requeues: int) -> str | None:
    """In a job stopped by a signal: None when it comes back (SLURM requeues it, or it
    requeued itself here), else why it does not."""
    jid = job_id() or ""
    info = _scontrol_job(jid)
    if int(info.get("Restarts", "0") or 0) > restarts():
        print(f"fer_sweep: SLURM requeued job {jid}: it continues where it stopped.", flush=True)
        return None
    if info.get("JobState") != "RUNNING":  # scancel: the job is ending for good
        return f"SLURM job {jid} was cancelled ({info.get('JobState', 'state unknown')})"
    if restarts() >= max_requeues:
        return (
            f"SLURM job {jid} was stopped by a signal after {restarts()} requeue(s), "
            f"hydra.launcher.max_num_timeout={max_requeues}"
        )
    said = _requeue(jid)
    if said:
        return f"SLURM job {jid} could not be requeued ({said})"
    print(
        f"fer_sweep: SLURM job {jid} requeued ({restarts() + 1} of "
        f"hydra.launcher.max_num_timeout={max_requeues}): it continues where it stopped.",
        flush=True,
    )
    return None


def _requeue(jid: str) -> str | None:
    """``scontrol requeue`` this job; None once SLURM has it, else scontrol's complaint."""

    said = ""
    for attempt in range(3):
        done = subprocess.run(
            ["scontrol", "requeue", jid],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=_ignore_term,
        )
        if done.returncode == 0 or int(_scontrol_job(jid).get("Restarts", "0") or 0) > restarts():
            return None
        said = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        time.sleep(1 + attempt)
    return said


def requeued_run(info: Mapping[str, Any] | None) -> str | None:
    """After a requeue: the MLflow run this job started under the sweep's parent run, when its
    checkpoint is there to continue from."""
    jid = job_id()
    if info is None or jid is None or restarts() == 0:
        return None
    from mlflow.tracking import MlflowClient

    from fer_sweep.sweep import store

    client = MlflowClient(tracking_uri=info["tracking_uri"])
    runs = store.newest_runs(
        client,
        info["experiment_id"],
        f"tags.mlflow.parentRunId = '{info['parent_run_id']}' and tags.`{JOB_TAG}` = '{jid}'",
    )
    for run in runs:
        folder = Path(run.data.params.get("trainer.checkpoint_dir", "checkpoints"))
        if run.info.status != "FINISHED" and (folder / f"{run.info.run_id}.pt").exists():
            return str(run.info.run_id)
    return None


# ---------------------------------------------------------------------------------------------
# Before submitting


def _sinfo() -> list[dict[str, str]]:
    """One row per node and partition: what the jobs of the sweep could be given."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N|%P|%a|%c|%m|%G"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        failed = (out.stderr.strip().splitlines() or ["no output"])[-1] if out.returncode else ""
    except subprocess.TimeoutExpired:
        failed = "no answer within 60 s"
    if failed:
        raise FerSweepError(
            f"hydra/launcher=slurm: `sinfo` cannot reach a SLURM cluster ({failed}). Run the "
            "sweep from a cluster's login node, or on this machine with "
            "hydra/launcher=submitit_local (same code path) or hydra/launcher=joblib."
        )
    keys = ("node", "partition", "avail", "cpus", "mem_mb", "gres")
    return [dict(zip(keys, line.split("|"), strict=True)) for line in out.stdout.splitlines()]


def _gpus(gres: str) -> int:
    """GPUs in a node's GRES field, e.g. ``gpu:a100:4(S:0-1)`` -> 4, ``(null)`` -> 0."""
    total = 0
    for item in gres.split(","):
        if item.startswith("gpu"):
            found = re.match(r"gpu(?::[^:(]+)?:(\d+)", item)
            total += int(found.group(1)) if found else 1
    return total


def _number(text: str) -> int:
    found = re.match(r"\d+", text)
    return int(found.group()) if found else 0


def _asks_gpus(launcher: Mapping[str, Any]) -> int:
    extra = {
        str(k).replace("-", "_"): v
        for k, v in (launcher.get("additional_parameters") or {}).items()
    }
    asked = [launcher.get(k) or extra.get(k) for k in ("gpus_per_node", "gpus_per_task", "gpus")]
    gres = str(launcher.get("gres") or extra.get("gres") or "")
    return max([_number(str(a)) for a in asked if a] + [_gpus(gres)] + [0])


def check_cluster(launcher: Mapping[str, Any]) -> None:
    """Refuse, before anything is submitted, a sweep whose jobs this cluster can never start."""
    rows = _sinfo()
    names = sorted({r["partition"].rstrip("*") for r in rows})
    partition = launcher.get("partition")
    if not partition:
        default = [r["partition"].rstrip("*") for r in rows if r["partition"].endswith("*")]
        if not default:
            raise FerSweepError(
                "hydra/launcher=slurm: this cluster has no default partition; name one with "
                f"hydra.launcher.partition=… (partitions: {', '.join(names)})."
            )
        partition = default[0]
    nodes = [r for r in rows if r["partition"].rstrip("*") == partition]
    if not nodes:
        raise FerSweepError(
            f"hydra.launcher.partition={partition}: no such partition on this cluster "
            f"(partitions: {', '.join(names) or 'none'}; `sinfo -s` lists them)."
        )
    problems = _problems(launcher, rows, nodes)
    if problems:
        raise FerSweepError(
            f"hydra/launcher=slurm: the sweep's jobs could never start on partition "
            f"{partition!r} (they would wait in the queue forever): " + "; ".join(problems) + "."
        )
    if not any(r["avail"] == "up" for r in nodes):
        log.warning(
            "partition %r is %s: the jobs wait until it is up", partition, nodes[0]["avail"]
        )


def _problems(
    launcher: Mapping[str, Any], rows: list[dict[str, str]], nodes: list[dict[str, str]]
) -> list[str]:
    """What a job asks that no node of the partition has, each with the setting that fixes it."""
    problems = []
    gpus = _asks_gpus(launcher)
    most_gpus = max(_gpus(r["gres"]) for r in nodes)
    if gpus > most_gpus:
        with_gpus = sorted({r["partition"].rstrip("*") for r in rows if _gpus(r["gres"]) >= gpus})
        have = f"at most {most_gpus} per node" if most_gpus else "no GPUs"
        fix = "set hydra.launcher.gpus_per_node=0 to train on CPUs"
        if with_gpus:
            fix += f", or pick a partition with GPUs: hydra.launcher.partition={with_gpus[0]}"
        problems.append(f"each job asks {gpus} GPU(s), the partition has {have} ({fix})")
    cpus = int(launcher.get("cpus_per_task") or 1) * int(launcher.get("tasks_per_node") or 1)
    most_cpus = max(_number(r["cpus"]) for r in nodes)
    if cpus > most_cpus:
        problems.append(
            f"hydra.launcher.cpus_per_task={launcher.get('cpus_per_task')}, its nodes have at "
            f"most {most_cpus} CPUs (set hydra.launcher.cpus_per_task={most_cpus} or less)"
        )
    mem_gb = launcher.get("mem_gb")
    most_mb = max(_number(r["mem_mb"]) for r in nodes)
    if mem_gb and float(mem_gb) * 1024 > most_mb:
        problems.append(
            f"hydra.launcher.mem_gb={mem_gb}, its nodes have at most {most_mb / 1024:.1f} GB "
            f"(set hydra.launcher.mem_gb={max(1, int(most_mb / 1024))} or less)"
        )
    return problems


# ---------------------------------------------------------------------------------------------
# Waiting for the jobs


def accounting_enabled() -> bool:
    """Whether ``sacct`` can answer (a slurmdbd is configured)."""
    out = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, timeout=60
    ).stdout
    found = re.search(r"AccountingStorageType\s*=\s*(\S+)", out)
    return found is None or found.group(1) != "accounting_storage/none"


def _queue_watcher() -> Any:
    """submitit's job watcher, reading ``squeue`` instead of ``sacct``."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class QueueWatcher(SlurmInfoWatcher):
        """Job states from slurmctld's queue: what it still knows of finished jobs too (for
        MinJobAge, 300 s by default); a job it has forgotten counts as ended."""

        def _make_command(self) -> list[str] | None:
            if super()._make_command() is None:
                return None
            return ["squeue", "-h", "-r", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%T|%N"]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            text = string.decode() if isinstance(string, bytes) else string
            info = super().read_info("JobID|State|NodeList\n" + text)
            for jid in self._registered - self._finished:
                info.setdefault(jid, {"JobID": jid, "State": "ENDED", "NodeList": ""})
            return info

    return QueueWatcher(delay_s=60)


class _OnceFilter(logging.Filter):
    """submitit's "Bypassing sacct error" warning once; its repetitions at debug level only."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Bypassing sacct error" not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg = f"{record.getMessage()} (shown once; sacct is polled again quietly)"
        record.args = ()
        return True


@contextlib.contextmanager
def quiet_polling() -> Iterator[None]:
    """For one sweep: squeue instead of sacct where accounting is off, and at most one sacct
    warning where it is on but fails."""
    from submitit.slurm.slurm import SlurmJob

    old = SlurmJob.watcher
    if not accounting_enabled():
        SlurmJob.watcher = _queue_watcher()
        log.info("SLURM accounting is off on this cluster: following the jobs with squeue")
    once = _OnceFilter()
    logging.getLogger("submitit").addFilter(once)
    try:
        yield
    finally:
        logging.getLogger("submitit").removeFilter(once)
        SlurmJob.watcher = old


def sbatch_refusal(err: BaseException) -> str | None:
    """sbatch's own error, when that is why submitit could not submit the sweep."""
    cause = err.__cause__
    if isinstance(cause, subprocess.CalledProcessError) and "sbatch" in str(cause.cmd):
        return f"sbatch refused the sweep's jobs: {str(err).strip()}"
    return None


def stopped_for_good(code: object, max_requeues: int) -> str | None:
    """A job's SystemExit ``code``: why it ends for good when a signal stopped it and it does
    not come back (None: it was no such signal, or it comes back)."""
    if code not in {128 + s for s in job_signals()}:
        return None  # submitit's own requeue (-1), or not an interruption
    return after_interruption(max_requeues)
