"""SIGINT / SIGTERM at any moment of a run or a sweep: nothing is left RUNNING in MLflow.

Three layers, innermost wins while it is active:

- the training loop turns a signal into a flag it polls between steps (``deferred``), so an
  epoch is never half-written into a checkpoint; a second signal stops at once;
- the rest of a job (validation, data loading, evaluation, artifacts) raises ``Interrupted`` at
  once (``raising``): the job marks its run KILLED;
- in a job that submitit started on a SLURM cluster, submitit's preemption / time-limit signal
  (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise) is handled like SIGTERM, so a job the
  scheduler stops also ends at a safe step; whether it then comes back is ``fer_sweep.slurm``'s
  decision;
- the process that launched a sweep (``SweepGuard``), between jobs or while it waits for worker
  processes, passes the signal on to its workers, waits for them to mark their runs, marks the
  parent run KILLED and exits with 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A worker process that was interrupted tells the process that launched the sweep with this
# one: unlike a person's second Ctrl-C it must not cut the launcher's own clean stop short.
WORKER_STOPPED = getattr(signal, "SIGUSR1", signal.SIGTERM)


class Interrupted(BaseException):  # noqa: N818 (a BaseException, like KeyboardInterrupt)
    """SIGINT/SIGTERM (or a SLURM job's preemption signal) arrived; ``signum`` says which
    (exit status 128 + signum)."""

    def __init__(self, signum: int = signal.SIGINT, where: str = "") -> None:
        self.signum = int(signum)
        super().__init__(f"{signal.Signals(self.signum).name}" + (f" ({where})" if where else ""))


def interruption(err: BaseException) -> BaseException | None:
    """The signal behind ``err``: itself, or the Interrupted / KeyboardInterrupt that a library
    turned into its own error while cleaning up (a SIGTERM inside an MLflow sqlite write comes
    back as "This transaction is closed", raised from the interrupted rollback)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (Interrupted, KeyboardInterrupt)):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def exit_status(err: BaseException) -> int:
    """130 for SIGINT (and Ctrl-C's KeyboardInterrupt), 143 for SIGTERM."""
    return 128 + getattr(err, "signum", signal.SIGINT)


def job_signals() -> tuple[int, ...]:
    """The signals that stop a job: SIGINT, SIGTERM and, in a SLURM job started by submitit,
    its preemption signal (else submitit's own handler would exit in the middle of a step)."""
    from fer_sweep import slurm  # local: the common case needs no SLURM module

    if slurm.in_submitit_job():
        return (*SIGNALS, slurm.preemption_signal())
    return SIGNALS


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _handlers(handler: Callable[[int, Any], None]) -> Iterator[None]:
    if not _main_thread():  # signals reach the main thread only (joblib's threading backend)
        yield
        return
    old = {s: signal.signal(s, handler) for s in job_signals()}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def raising(where: str = "") -> Iterator[None]:
    """A signal raises Interrupted at once (Ctrl-C's default, for SIGTERM too)."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum, where)

    with _handlers(handler):
        yield


@contextlib.contextmanager
def deferred() -> Iterator[Callable[[], int]]:
    """A signal becomes a flag (the signal number, 0 while none came) for a loop to poll at a
    safe point; a second one raises Interrupted at once."""
    got = {"signum": 0}

    def handler(signum: int, frame: Any) -> None:
        if got["signum"]:
            raise Interrupted(signum, "second signal")
        got["signum"] = signum

    with _handlers(handler):
        yield lambda: got["signum"]


def descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = entry.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class SweepGuard:
    """In the process that launched a multirun: on SIGINT/SIGTERM outside a job, pass the
    signal on to the worker processes, give them ``grace`` seconds to mark their runs KILLED,
    call ``on_signal(signum)`` (which marks the parent KILLED and says how to continue), end
    the workers that are left and exit with 128 + signum.

    A second signal cuts the wait short but still marks the parent (a `pkill` or a terminal's
    Ctrl-C reaches every process of the sweep, and impatient users press twice); only a third
    exits at once. Pool workers (joblib's loky) outlive their jobs, so whatever is left of them
    after the wait is killed: none may go on training for a sweep that has ended."""

    def __init__(self, on_signal: Callable[[int], None], grace: float = 30.0) -> None:
        self.on_signal = on_signal
        self.grace = grace
        self.old: dict[int, Any] = {}
        self.fired = False
        self.hurry = False

    def install(self) -> None:
        if _main_thread() and not self.old:
            self.old = {s: signal.signal(s, self._handle) for s in {*SIGNALS, WORKER_STOPPED}}

    def uninstall(self) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == WORKER_STOPPED and signum not in SIGNALS:
            if self.fired:
                return  # the echo of our own stop, from a worker that got it
            signum = signal.SIGTERM  # a worker was preempted: stop the sweep as for SIGTERM
        elif self.fired:
            if self.hurry:
                os._exit(128 + signum)  # a third signal: at once
            self.hurry = True  # a second: stop waiting for the workers, still mark the parent
            return
        self.fired = True
        workers = descendants(os.getpid())
        for pid in workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and not self.hurry and any(alive(p) for p in workers):
            time.sleep(0.2)
        for pid in workers:  # before on_signal, which marks the runs they left RUNNING
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            self.on_signal(signum)
        except BaseException:  # the parent could not be marked: say why, still stop
            traceback.print_exc()
        finally:
            self.uninstall()
            # Exit here rather than raise SystemExit: the signal may have landed inside a
            # library (Hydra composing the next job's config) whose clean-up code turns the
            # exception into an error of its own and the exit status into 1. The parent is
            # marked and the workers are gone; only the logs are left to flush.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signum)


def alive(pid: int) -> bool:
    """Running and not a zombie (an exited child its parent has not reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
