"""``python -m fer_sweep.ui``: the MLflow UI over fer_sweep's store, on 127.0.0.1 by default.

A thin wrapper around ``python -m mlflow server`` so that ``make ui`` opens exactly the store the
sweeps write to (``sqlite:///mlflow.db`` in the current folder, like ``mlflow.tracking_uri``),
and so that the usual mistakes (port taken, store path missing) are one clear message instead of
a server log. It binds to 127.0.0.1 unless --host says otherwise: the UI has no login, and
anyone who can reach it can read and delete runs.

Any option it does not know is passed to ``mlflow server`` unchanged, e.g.
``python -m fer_sweep.ui --allowed-hosts mlflow.lab.example``.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from fer_sweep.errors import FerSweepError
from fer_sweep.sweep import store
from fer_sweep.tools.cli import user_errors


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m fer_sweep.ui",
        description="Start the MLflow UI (and tracking server) over fer_sweep's runs. "
        "Unknown options are passed on to `mlflow server`.",
    )
    parser.add_argument(
        "--tracking-uri",
        default=store.default_uri(),
        help="the store the sweeps logged to, as in mlflow.tracking_uri "
        f"(default: $MLFLOW_TRACKING_URI, else {store.DEFAULT_URI} in "
        "the current folder; now %(default)s)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default: %(default)s, this machine only; "
        "0.0.0.0 exposes the UI, which has no login, to the network)",
    )
    parser.add_argument("--port", type=int, default=5000, help="(default: %(default)s)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes; one is plenty for one person (default: %(default)s)",
    )
    parser.add_argument(
        "--artifacts-destination",
        default=None,
        help="where artifacts uploaded through this server are stored "
        "(default: MLflow's ./mlartifacts). Runs logged straight to a "
        "sqlite store keep their artifacts where they were written.",
    )
    return parser.parse_known_args(argv)


def check_store(uri: str) -> str | None:
    """A file store's folder must exist; returns a note when the store is not there yet."""
    if uri.startswith(("http://", "https://")):
        raise FerSweepError(
            f"--tracking-uri={uri} is already a server: open {uri} in a browser. "
            "--tracking-uri takes the server's backend store, e.g. "
            "sqlite:///mlflow.db or postgresql://user@host/db."
        )
    path = store.local_path(uri) if uri.startswith("sqlite:///") else None
    if path is not None and not path.parent.is_dir():
        raise FerSweepError(
            f"--tracking-uri={uri}: folder {path.parent} does not exist. "
            "Point it at the sweeps' store (mlflow.tracking_uri), e.g. "
            "sqlite:///mlflow.db from the folder the sweeps ran in."
        )
    store.check_uri(uri, create=True)  # a scheme, driver, file or database that cannot work
    if path is not None and not path.exists():
        return (
            f"fer_sweep: note: {path.resolve()} does not exist yet; the UI starts on an "
            "empty store (run a sweep from this folder, or pass --tracking-uri)."
        )
    return None


def check_port(host: str, port: int) -> None:
    """Fail now, by name, when the port is taken (uvicorn would bury it in its log)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise FerSweepError(
                    f"port {port} on {host} is already in use (another MLflow UI?)"
                    f"; pick a free one with --port {port + 1}."
                ) from None
            raise FerSweepError(
                f"cannot listen on {host}:{port}: {err.strerror}. Use --host "
                "127.0.0.1 or an address of this machine."
            ) from None


def server_command(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        args.tracking_uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(args.workers),
        "--serve-artifacts",
    ]
    if args.artifacts_destination:
        cmd += ["--artifacts-destination", args.artifacts_destination]
    return cmd + list(extra)


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse_args(argv)
    checked: list[str | None] = []

    def check() -> int:
        if not 0 < args.port < 65536:
            raise FerSweepError(f"--port {args.port} is not a port number (1-65535).")
        checked.append(check_store(args.tracking_uri))
        check_port(args.host, args.port)
        return 0

    if user_errors(check):
        return 2
    note = checked[0]
    if note:
        print(note, file=sys.stderr)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(
        f"fer_sweep: MLflow UI for {args.tracking_uri} at http://{shown}:{args.port} "
        "(Ctrl-C stops it). MLflow 3 opens on its GenAI view: pick 'Model training' (top "
        "left) to see the sweeps' runs; a sweep's jobs unfold under its parent run's [+].",
        file=sys.stderr,
        flush=True,
    )
    # MLflow's GenAI job runner (LLM judges, trace roll-ups) is one more process that a
    # training UI never uses; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true in the environment wins.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}

    def stop(signum: int, frame: FrameType | None) -> None:  # SIGTERM: take the server along
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    child = subprocess.Popen(server_command(args, extra), env=env)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return 0


if __name__ == "__main__":
    sys.exit(main())
