"""A real one-node SLURM cluster on this machine for the tests: munged, slurmctld and slurmd.

Debian's `slurm-wlm` and `munge` packages (`.ci/run` installs them). Everything the daemons
write — munge key and socket, slurm.conf, state, spool, logs, pid files — lives in one temporary
folder; the daemons run in the foreground as children of the test process and are stopped at
the end. No accounting daemon: `sacct` fails, as on many small clusters, which is part of what
is tested. The client commands find the cluster through ``Cluster.env`` (``SLURM_CONF``), so
nothing of the machine's own configuration is touched or read.

    python -m tests.slurm_cluster /tmp/cluster   # the same cluster by hand, until Ctrl-C
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PARTITION = "fertest"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scontrol")


def unavailable() -> str | None:
    """Why this machine cannot run the cluster (None when it can)."""
    missing = [b for b in BINARIES if shutil.which(b, path=_path()) is None]
    if missing:
        return (
            f"SLURM binaries not found ({', '.join(missing)}): "
            "`apt-get install -y slurm-wlm munge` (Debian) installs them"
        )
    if os.geteuid() != 0:
        return "the one-node SLURM cluster needs root (slurmd starts jobs as their user)"
    return None


def _path() -> str:
    """PATH plus the sbin folders, where Debian puts the daemons."""
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_line() -> str:
    """This machine as slurmd itself sees it (CPUs, sockets, memory): a node configured with
    more than it has is drained."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    words = [w for w in out.split()[:8] if w.split("=")[0] != "UpTime"]
    return " ".join(words) + " State=UNKNOWN"


@dataclass
class Cluster:
    """A running cluster: ``env`` points SLURM's client commands (and the jobs) at it."""

    root: Path
    env: dict[str, str]
    partition: str = PARTITION
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A SLURM client command against this cluster."""
        return subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, check=check, timeout=60
        )

    def jobs(self) -> list[dict[str, str]]:
        """The queue: one dict per job (id, array job/task, state, name)."""
        out = self.run("squeue", "-h", "-o", "%i|%F|%K|%T|%j|%r").stdout
        keys = ("id", "array_job", "array_task", "state", "name", "reason")
        return [dict(zip(keys, line.split("|"), strict=True)) for line in out.splitlines()]

    def logs(self) -> str:
        """The daemons' logs, for a failing test's message."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def _write_conf(root: Path, host: str) -> Path:
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=fersweep",
                f"SlurmctldHost={host}",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                # cred_expire also holds a requeued job back before it may start again
                # (120 s by default): 5 s keeps the preemption test short.
                f"AuthInfo=socket={root / 'munge' / 'munge.socket'},cred_expire=5",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "MpiDefault=none",
                "ReturnToService=2",
                "SchedulerParameters=sched_interval=1,bf_interval=1",
                "KillWait=20",
                "MinJobAge=600",
                "InactiveLimit=0",
                _node_line(),
                f"PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    return conf


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each daemon (its own session: the jobs slurmd started go with it), then
    SIGKILL to what is still there after 10 s."""
    for proc in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in reversed(procs):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def one_node_cluster(root: Path, timeout: float = 60) -> Iterator[Cluster]:
    """Start munged, slurmctld and slurmd under ``root``; yield once the node is idle; stop
    them (and any job still running) at the end."""
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    conf = _write_conf(root, host)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    env = {**os.environ, "PATH": _path(), "SLURM_CONF": str(conf)}
    for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        if var != "SLURM_CONF":  # a developer's own cluster settings must not leak in
            del env[var]
    cluster = Cluster(root=root, env=env)
    logs = root / "log"
    try:
        cluster.procs.append(
            _start(
                [
                    "munged",
                    "--foreground",
                    "--force",
                    f"--key-file={key}",
                    f"--socket={root / 'munge' / 'munge.socket'}",
                    f"--pid-file={root / 'munge' / 'munged.pid'}",
                    f"--seed-file={root / 'munge' / 'munged.seed'}",
                    f"--log-file={logs / 'munged.log'}",
                ],
                env,
                logs / "munged.out.log",
            )
        )
        _wait_for(lambda: (root / "munge" / "munge.socket").exists(), timeout, "munged", cluster)
        cluster.procs.append(
            _start(["slurmctld", "-D", "-i", "-f", str(conf)], env, logs / "slurmctld.out.log")
        )
        _wait_for(lambda: cluster.run("sinfo", check=False).returncode == 0, timeout, "", cluster)
        cluster.procs.append(
            _start(["slurmd", "-D", "-f", str(conf)], env, logs / "slurmd.out.log")
        )
        _wait_for(lambda: _node_state(cluster) == "idle", timeout, "slurmd", cluster)
        yield cluster
    finally:
        if cluster.procs and len(cluster.procs) > 1:
            cluster.run("scancel", "--full", "--user", "root", check=False)
        _stop(cluster.procs)


def _node_state(cluster: Cluster) -> str:
    out = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
    return out.rstrip("*~#!%$@^-")


def _wait_for(ready: object, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():  # type: ignore[operator]
            return
        if any(p.poll() is not None for p in cluster.procs):
            break
        time.sleep(0.3)
    raise RuntimeError(f"the test SLURM cluster did not start ({what}):\n{cluster.logs()}")


if __name__ == "__main__":
    reason = unavailable()
    if reason:
        sys.exit(reason)
    with one_node_cluster(Path(sys.argv[1])) as c:
        print(f"export SLURM_CONF={c.env['SLURM_CONF']}   # partition {c.partition}; Ctrl-C stops")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
