"""SIGINT / SIGTERM in the process that launched a sweep: nothing is left RUNNING in MLflow.

Inside a job the core's ``fer_sweep.core.interrupt`` turns a signal into a flag the training
loop polls (``deferred``) or an ``Interrupted`` raised at once (``raising``), and the job marks
its run KILLED. Here, the process that launched a multirun (``SweepGuard``), between jobs or
while it waits for worker processes, passes the signal on to its workers, waits for them to
mark their runs, marks the parent run KILLED and exits with 128 + the signal number. Whether a
job that SLURM stopped comes back is ``fer_sweep.sweep.slurm``'s decision.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fer_sweep.core.interrupt import SIGNALS, on_main_thread

# A worker process that was interrupted tells the process that launched the sweep with this
# one: unlike a person's second Ctrl-C it must not cut the launcher's own clean stop short.
WORKER_STOPPED = getattr(signal, "SIGUSR1", signal.SIGTERM)


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
        if on_main_thread() and not self.old:
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
        # Wait for those that can act on the signal: the resource trackers of multiprocessing
        # and loky ignore SIGINT and SIGTERM, and waiting for them made every interrupted joblib
        # sweep sit out the whole grace period.
        acting = [pid for pid in workers if not ignores(pid, signum)]
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and not self.hurry and any(alive(p) for p in acting):
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


def ignores(pid: int, signum: int) -> bool:
    """Whether ``pid`` ignores ``signum`` (SIG_IGN: its SigIgn mask in /proc; False where that
    cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False
