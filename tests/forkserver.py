"""A warm interpreter for the tests' CLI runs: ``python -m fer_sweep …`` forked, not started.

Most of a CLI test's CPU time is a new interpreter importing torch, torch._dynamo (which every
optimizer pulls in), MLflow and its sqlite store, Hydra and fer_sweep: ~5 CPU-s per process on
this 2-core machine, paid again by every ``run_cli``. This server imports them once, then forks
one child per request; the child is a fresh ``python -m <module>`` in all that a test can see:
its own pid and exit status, its own stdin/stdout/stderr (the test's pipes, passed over the
socket), its own cwd, environment, argv and, if asked, process session. It runs the module with
``runpy`` as ``-m`` does, then what interpreter shutdown runs (non-daemon threads joined, atexit
handlers), and exits with the status the interpreter would give (``KeyboardInterrupt``: killed
by SIGINT, as CPython does).

Forking is safe here because the server never runs anything after its imports: no OpenMP pool,
no sqlite connection, no logging configured, no thread of its own (torch's and jemalloc's are
fork-aware). What it cannot give a child is an interpreter started under other settings, so a
request whose environment differs from the server's in a variable read at start-up or import
(``PYTHON*``, thread pools, ``LD_*``, ``MPLBACKEND``, …) is answered "fresh", and the client
starts an ordinary subprocess instead; so are modules outside fer_sweep.
``FER_SWEEP_TEST_FORK=0`` makes every CLI run an ordinary subprocess.

Protocol (AF_UNIX, SOCK_SEQPACKET, one connection per run): the client sends a JSON request with
three file descriptors (stdin, stdout, stderr); the server answers ``pid <n>`` or ``fresh``, and
later ``exit <code>`` (``-N``: killed by signal N, as ``subprocess`` reports it).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from fer_sweep.core.runtime import OMP_WAIT_POLICY_DEFAULT

PRELOAD = (
    "torch",
    "torch._dynamo",
    "torchvision",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "hydra",
    "matplotlib.pyplot",
    "fer_sweep.sweep.job",
    "fer_sweep.sweep.tracking",
    "fer_sweep.tools.report.cli",
)

# Variables an interpreter reads when it starts or when torch, NumPy, matplotlib import (not
# TORCHINDUCTOR_CACHE_DIR, set by importing torchvision, nor KMP_*, set by importing sklearn or
# inductor for an Intel OpenMP that this torch, on GNU OpenMP, does not load).
STARTUP_PREFIXES = ("PYTHON", "OMP_", "MKL_", "GOMP_", "OPENBLAS_", "LD_", "MALLOC_")
STARTUP_NAMES = ("MPLBACKEND", "MPLCONFIGDIR", "CUDA_VISIBLE_DEVICES", "PATH")


def startup_env(env: dict[str, str]) -> dict[str, str]:
    """The part of an environment that only a new interpreter would honour, as fer_sweep's
    CLI completes it before torch loads OpenMP (core/runtime.tune: OMP_WAIT_POLICY=PASSIVE
    unless set). The server starts with that completion, so its children's OpenMP threads
    sleep as a started CLI's do, and a test process where tune() ran still forks."""
    out = {k: v for k, v in env.items() if k.startswith(STARTUP_PREFIXES) or k in STARTUP_NAMES}
    out.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY_DEFAULT)
    return out


def forkable(module: str) -> bool:
    return module == "fer_sweep" or module.startswith("fer_sweep.")


def _exit_code(exc: SystemExit) -> int:
    """What CPython exits with for ``raise SystemExit(code)`` (a message goes to stderr)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _reseed() -> None:
    """A new interpreter seeds Python's and NumPy's global generators from the OS; forked
    children would otherwise all draw the server's numbers."""
    import random

    import numpy as np

    random.seed()
    np.random.seed()


def _child(request: dict, fds: list[int], started: int) -> None:
    """Become ``python -m <module> <args>`` and never return; one byte on ``started`` once
    the child is in its session, folder and environment (where Popen would have exec'd)."""
    code = 1
    try:
        if request["new_session"]:
            os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.write(started, b"1")
        os.close(started)
        sys.argv = ["-m", *request["args"]]
        sys.path[0] = request["cwd"]
        _reseed()
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = -signal.SIGINT
        except BaseException:
            traceback.print_exc()
            code = 1
        threading._shutdown()  # type: ignore[attr-defined]  # what CPython does at exit
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF)


def serve(path: str) -> None:
    """Preload, say ``ready`` on stdout, then fork one child per request until the parent (the
    pytest process) is gone or the socket is removed."""
    import gc
    import importlib

    base = startup_env(dict(os.environ))  # before the imports, which may set some
    gc.disable()
    for name in PRELOAD:
        importlib.import_module(name)
    # Children would otherwise page in (copy on write) and scan the whole preloaded heap at
    # their first full collection: the preloaded objects are left out of collections.
    gc.freeze()
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    children: dict[int, socket.socket] = {}
    while os.getppid() == parent and os.path.exists(path):
        readable, _, _ = select.select([listener], [], [], 0.05)
        if readable:
            conn, _ = listener.accept()
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(msg)
            if startup_env(request["env"]) != base or not forkable(request["module"]):
                conn.send(b"fresh")
                conn.close()
            else:
                started_r, started_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    gc.enable()
                    os.close(started_r)
                    listener.close()
                    conn.close()
                    for other in children.values():
                        other.close()
                    _child(request, fds, started_w)
                os.close(started_w)
                os.read(started_r, 1)  # empty if the child failed first: its status says so
                os.close(started_r)
                conn.send(f"pid {pid}".encode())
                children[pid] = conn
            for fd in fds:
                os.close(fd)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid)
            try:
                conn.send(f"exit {os.waitstatus_to_exitcode(status)}".encode())
            except OSError:
                pass  # the test went away
            conn.close()
    for pid in children:
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    serve(sys.argv[1])


# ----------------------------------------------------------------------------- the client


class Forked:
    """The part of ``subprocess.Popen`` the tests use, for a child of the fork server: pid,
    poll, wait, communicate, send_signal/terminate/kill, returncode, and ``stdout``'s readline
    and read (unbuffered, so that what they leave is still there for ``communicate``)."""

    def __init__(
        self, args: list[str], conn: socket.socket, pid: int, out_fd: int, err_fd: int | None
    ) -> None:
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self._conn = conn
        self._fds = {"out": out_fd, **({"err": err_fd} if err_fd is not None else {})}
        self._chunks: dict[str, list[bytes]] = {k: [] for k in self._fds}
        self.stdout = _Lines(out_fd)

    def __del__(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def _take_exit(self, timeout: float | None) -> bool:
        if self.returncode is not None:
            return True
        if not select.select([self._conn], [], [], timeout)[0]:
            return False
        msg = self._conn.recv(64).decode()
        if not msg.startswith("exit "):
            raise RuntimeError(f"the fork server went away while running {self.args}")
        self.returncode = int(msg.split()[1])
        self._conn.close()
        return True

    def poll(self) -> int | None:
        self._take_exit(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._take_exit(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        """Read stdout (and stderr) to their ends, then wait, as Popen.communicate does
        (universal newlines; TimeoutExpired leaves what was read for the next call)."""

        deadline = None if timeout is None else time.monotonic() + timeout
        while self._fds:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = select.select(list(self._fds.values()), [], [], left)[0]
            if not ready:
                raise subprocess.TimeoutExpired(self.args, timeout)
            for name, fd in list(self._fds.items()):
                if fd in ready:
                    data = os.read(fd, 1 << 16)
                    if data:
                        self._chunks[name].append(data)
                    else:
                        os.close(fd)
                        del self._fds[name]
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.wait(left)
        out = {k: _text(b"".join(v)) for k, v in self._chunks.items()}
        return out["out"], out.get("err")


class _Lines:
    """A child's stdout read a byte at a time: a buffered text stream would take more than the
    line asked for, which ``communicate`` (reading the descriptor) would then never see."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def readline(self) -> str:
        line = bytearray()
        while not line.endswith(b"\n") and (byte := os.read(self.fd, 1)):
            line += byte
        return _text(bytes(line))

    def read(self) -> str:
        chunks = []
        while data := os.read(self.fd, 1 << 16):
            chunks.append(data)
        return _text(b"".join(chunks))


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


class Client:
    """Starts the server on first use (once per test process), then asks it for children;
    ``spawn`` returns None where the child must be an ordinary subprocess."""

    def __init__(self, repo: str, env: dict[str, str]) -> None:
        self.repo = repo
        self.env = env
        self.lock = threading.Lock()
        self.path: str | None = None
        self.server = None
        self.broken = os.environ.get("FER_SWEEP_TEST_FORK", "1") == "0"
        self.why = ""  # why the last spawn gave an ordinary subprocess (for debugging)

    def _start(self) -> str | None:
        with self.lock:
            if self.broken or self.path:
                return self.path
            path = os.path.join(tempfile.mkdtemp(prefix="forkserver_"), "socket")
            self.server = subprocess.Popen(
                [sys.executable, "-m", "tests.forkserver", path],
                cwd=self.repo,
                env={**startup_env(self.env), **self.env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=True,
            )
            if self.server.stdout.readline().strip() != "ready":
                self.broken = True
                print("fork server failed to start: CLI tests start fresh interpreters")
                return None
            atexit.register(self.stop)
            self.path = path
            return path

    def stop(self) -> None:
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)
        if self.server is not None:
            self.server.wait(timeout=10)

    def spawn(
        self,
        module: str,
        args: list[str],
        cwd: str,
        env: dict[str, str],
        merge_stderr: bool,
        new_session: bool,
    ) -> Forked | None:
        ours, theirs = startup_env(env), startup_env(self.env)
        if not forkable(module) or ours != theirs:
            changed = sorted(k for k in {*ours, *theirs} if ours.get(k) != theirs.get(k))
            self.why = f"module {module}" if not forkable(module) else f"changed {changed}"
            return None
        path = self._start()
        if path is None:
            self.why = "no server"
            return None
        out_r, out_w = os.pipe()
        err_r, err_w = (None, out_w) if merge_stderr else os.pipe()
        stdin = os.open(os.devnull, os.O_RDONLY)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        answer = ""
        try:
            conn.connect(path)
            request = {
                "module": module,
                "args": args,
                "cwd": cwd,
                "env": env,
                "new_session": new_session,
            }
            socket.send_fds(conn, [json.dumps(request).encode()], [stdin, out_w, err_w])
            answer = conn.recv(64).decode()
        except OSError as exc:
            self.broken = True  # the server is gone: fresh interpreters from now on
            self.why = f"server gone: {exc}"
        finally:
            for fd in {stdin, out_w, err_w}:
                os.close(fd)
        if not answer.startswith("pid "):
            conn.close()
            for fd in (out_r, err_r):
                if fd is not None:
                    os.close(fd)
            return None
        full = [sys.executable, "-m", module, *args]
        return Forked(full, conn, int(answer.split()[1]), out_r, err_r)
