"""A lab's shared server, real: PostgreSQL (initdb into a temporary folder, loopback, a free
port, password logins) behind MLflow's basic-auth tracking server with artifacts served
through it. Both are started the way docs/reliability.md tells an administrator to, and
stopped by process id.

PostgreSQL's server refuses to run as root: when the tests run as root, its programs run as
the ``postgres`` user (Debian's package creates it) and its folders belong to that user.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from glob import glob
from pathlib import Path

from tests.mlflow_server import free_port

# Who logs in, with which password (made up per test session; never the same twice).
ADMIN, ALICE, BOB = "admin", "alice", "bob"  # the admin; an experiment's owner; a reader


def pg_bin() -> Path | None:
    """Debian's versioned PostgreSQL programs (initdb, pg_ctl), the newest if several."""
    found = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def unavailable() -> str | None:
    """Why the team server cannot run here (None: it can)."""
    if pg_bin() is None:
        return "needs PostgreSQL's server (apt-get install postgresql)"
    for module in ("psycopg", "flask_wtf"):  # the .[team] extra: psycopg 3, mlflow[auth]
        try:
            __import__(module)
        except ImportError:
            return f"needs the team extra (pip install -e '.[team]'): no {module}"
    return None


def _as_postgres(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


@dataclass
class Postgres:
    port: int
    data: Path
    password: str  # of role "fer", the owner of the databases below

    def url(self, db: str, user: str = "fer", password: bool = False) -> str:
        secret = f":{self.password}" if password else ""
        return f"postgresql+psycopg://{user}{secret}@127.0.0.1:{self.port}/{db}"

    def ctl(self, *args: str) -> None:
        _as_postgres([str(pg_bin() / "pg_ctl"), "-D", str(self.data), *args])

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.ctl("-o", opts, "-l", str(self.data.parent / "postgres.log"), "-w", "start")

    def stop(self) -> None:
        self.ctl("-m", "fast", "-w", "stop")

    def sql(self, statement: str, db: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="fer", password=self.password, dbname=db,
            autocommit=True,
        ) as conn:  # fmt: skip
            conn.execute(statement)


@contextmanager
def postgres(tmp: Path) -> Iterator[Postgres]:
    """initdb (password logins over TCP, none without), start, yield, stop. Its folder is a
    new one under the system's temporary folder: pytest's are private to root, and PostgreSQL
    runs as postgres."""
    root = Path(tempfile.mkdtemp(prefix="fer_sweep_pg_"))
    pw = secrets.token_urlsafe(16)
    (root / "pw").write_text(pw)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pw", "postgres")
    _as_postgres(
        [str(pg_bin() / "initdb"), "-D", str(root / "data"), "-U", "fer", "--pwfile",
         str(root / "pw"), "--auth-host=scram-sha-256", "--auth-local=reject", "--no-sync",
         "-E", "UTF8"]
    )  # fmt: skip
    (root / "pw").unlink()
    pg = Postgres(free_port(), root / "data", pw)
    pg.start()
    try:
        for db in ("mlflow", "auth", "optuna"):
            pg.sql(f"CREATE DATABASE {db}")
        yield pg
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class TeamServer:
    url: str
    pg: Postgres
    passwords: dict[str, str]
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    backend: str | None = None  # the runs' store (default: the "mlflow" database)
    auth: bool = True  # MLflow's basic-auth app (False: an open server, for comparison)
    auth_cache_s: int = 60  # how long a worker trusts a checked login (0: re-hash each time)
    auth_db: str = "auth"  # the users and permissions' database

    def env(self, user: str, password: str | None = None) -> dict[str, str]:
        """A user's environment: MLflow's login variables and PostgreSQL's password (for an
        Optuna storage on the same server), never in a URL."""
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password or self.passwords[user],
            "PGPASSWORD": self.pg.password,
        }

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            *(["--app-name", "basic-auth"] if self.auth else []),
            "--backend-store-uri", self.backend or self.pg.url("mlflow"),
            "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--workers", "2",
        ]  # fmt: skip

    def start(self, timeout: float = 120) -> None:
        ini = self.root / "basic_auth.ini"
        ini.write_text(
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = {self.pg.url(self.auth_db)}\n"
            f"admin_username = {ADMIN}\n"
            f"admin_password = {self.passwords[ADMIN]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # a checked login is trusted for 60 s per worker instead of re-hashing the password
            # (~0.1 s of CPU, scrypt) on every request (docs/reliability.md, performance.md)
            f"auth_cache_ttl_seconds = {self.auth_cache_s}\n"
        )
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "PGPASSWORD": self.pg.password,
        }
        log = (self.root / "server.log").open("ab")
        self.proc = subprocess.Popen(
            self.command(), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):  # noqa: S310
                    return
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server not ready in {timeout} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def log_tail(self, n: int = 3000) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def admin(self):  # noqa: ANN201 (MLflow's AuthServiceClient)
        from mlflow.server import get_app_client

        with _env(self.env(ADMIN)):
            return get_app_client("basic-auth", tracking_uri=self.url)


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def team_server(tmp: Path) -> Iterator[TeamServer]:
    """PostgreSQL and the basic-auth server on it, with users alice and bob."""
    with postgres(tmp) as pg:
        root = tmp / "mlflow"
        root.mkdir()
        passwords = {u: secrets.token_urlsafe(12) for u in (ADMIN, ALICE, BOB)}
        server = TeamServer(f"http://127.0.0.1:{free_port()}", pg, passwords, root)
        server.start()
        try:
            with _env(server.env(ADMIN)):
                auth = server.admin()
                auth.create_user(ALICE, passwords[ALICE])
                auth.create_user(BOB, passwords[BOB])
            yield server
        finally:
            server.stop()


LOAD = """
import sys, time
from mlflow.tracking import MlflowClient
from fer_sweep.sweep import tracking
client = MlflowClient(sys.argv[1])
run = tracking.create_run(client, sys.argv[2], f"load-{sys.argv[3]}", {"fer_sweep.role": "load"})
t0 = time.perf_counter()
for epoch in range(100):
    tracking.log_metrics(client, run, {"train_loss": 1 / (epoch + 1), "train_acc": epoch / 100,
        "val_loss": 2 / (epoch + 1), "val_acc": epoch / 200, "lr": 0.01, "epoch_seconds": 1.0},
        step=epoch)
tracking.retry(client.set_terminated, run)
print(run, time.perf_counter() - t0)
"""


def load(url: str, env: dict[str, str], exp_id: str, procs: int = 8) -> list[tuple[str, float]]:
    """``procs`` processes at once (a SLURM array's shape), each one run of 100 epochs of the
    six per-epoch metrics through ``url``; (run id, seconds) each."""
    started = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD, url, exp_id, str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(procs)
    ]
    results = []
    for p in started:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        run_id, seconds = out.strip().splitlines()[-1].split()  # MLflow may print above it
        results.append((run_id, float(seconds)))
    return results
