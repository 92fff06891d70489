"""A real MLflow tracking server for the tests, started the way a user starts one.

It runs ``python -m fer_sweep.ui`` (which runs ``mlflow server --serve-artifacts``) on 127.0.0.1
and a free port, over a sqlite store and an artifact folder in a temporary directory. Starting
one takes 20-90 s on a busy two-core machine, so the test modules share one server and one
sweep logged to it (two jobs in parallel through the joblib launcher): each module's session
fixture enters ``shared_server()``, and the server stops (its whole process group, by id) when
the last of them leaves.

Which process ran a job is read from its Hydra log: ``PID_LOGS`` switches Hydra's log format
to one that starts with the process id (``%(process)d``), an ordinary command-line override.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, real_data, run_cli

EXPERIMENT = "team"
SWEEP_MODELS = ("cnn2", "cnn3")
PID_LOGS = [
    'hydra.job_logging.formatters.simple.format="pid=%(process)d [%(name)s] %(message)s"',
    'hydra.hydra_logging.formatters.simple.format="pid=%(process)d [HYDRA] %(message)s"',
]


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Sweep:
    """The two-job sweep logged to the server: its CLI result and folder."""

    proc: subprocess.CompletedProcess[str]
    cwd: Path


@dataclass
class Server:
    url: str
    root: Path
    proc: subprocess.Popen[bytes]
    log: Path
    sweep: Sweep | None = field(default=None)

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def get(self, endpoint: str, **query: str) -> bytes:
        url = f"{self.url}{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 (our 127.0.0.1)
            return resp.read()

    def get_json(self, endpoint: str, **query: str) -> Any:
        return json.loads(self.get(endpoint, **query))

    def post_json(self, endpoint: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(
            f"{self.url}{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (our 127.0.0.1)
            return json.loads(resp.read())

    def stop(self) -> None:
        """Terminate the process group (fer_sweep.ui, mlflow server, uvicorn, job runner)."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass


def start_server(root: Path, timeout: float = 180.0) -> Server:
    """``python -m fer_sweep.ui`` on a free port (its default host); returns once /health
    answers."""
    port = free_port()
    log = root / "server.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fer_sweep.ui",
                "--tracking-uri",
                f"sqlite:///{root / 'server.db'}",
                "--port",
                str(port),  # host: 127.0.0.1 default
                "--artifacts-destination",
                str(root / "artifacts"),
            ],
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )  # its own process group: stop() ends all of it
    server = Server(url=f"http://127.0.0.1:{port}", root=root, proc=proc, log=log)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the MLflow server exited ({proc.returncode}):\n{server.log_tail()}"
            )
        try:
            if server.get("/health").strip() == b"OK":
                return server
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(
                f"the MLflow server did not answer /health within {timeout:.0f} s:"
                f"\n{server.log_tail()}"
            )
        time.sleep(0.5)


_shared: dict[str, Any] = {"server": None, "users": 0}


@contextmanager
def shared_server(factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for every module that asks; stopped when the last one is done with it."""
    if _shared["server"] is None:
        _shared["server"] = start_server(factory.mktemp("mlflow_server"))
    _shared["users"] += 1
    try:
        yield _shared["server"]
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            _shared["server"].stop()
            _shared["server"] = None


def sweep_on(server: Server, factory: pytest.TempPathFactory) -> Sweep:
    """A two-job parallel sweep logged to the server, run once per server (cached on it)."""
    if server.sweep is None:
        cwd = factory.mktemp("server_sweep")
        data = [] if real_data() else ["data=synthetic"]
        proc = run_cli(
            [
                "-m",
                "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=2",
                f"model={','.join(SWEEP_MODELS)}",
                "trainer.epochs=1",
                "data.limit_per_class=5",
                "trainer.progress=false",
                "mlflow.log_model=false",
                f"mlflow.tracking_uri={server.url}",
                f"mlflow.experiment={EXPERIMENT}",
                f"hydra.sweep.dir={cwd / 'sweep'}",
                *PID_LOGS,
                *data,
            ],
            cwd=cwd,
            timeout=600,
        )
        server.sweep = Sweep(proc=proc, cwd=cwd)
    return server.sweep


def job_pids(sweep_dir: Path, n: int) -> set[int]:
    """The process id that each of the n jobs' own logs was written from (PID_LOGS)."""
    pids = set()
    for num in range(n):
        logs = list((sweep_dir / str(num)).glob("*.log"))
        assert logs, f"job {num} left no log in {sweep_dir / str(num)}"
        found = {int(p) for p in re.findall(r"^pid=(\d+) \[", logs[0].read_text(), re.M)}
        assert len(found) == 1, (num, found)
        pids |= found
    return pids


def launcher_pid(stdout: str) -> int:
    """The process id of the sweep's own (launching) process, from its [HYDRA] lines."""
    found = set(re.findall(r"^pid=(\d+) \[HYDRA\]", stdout, re.M))
    assert len(found) == 1, found
    return int(found.pop())
