"""A signal (SIGINT, SIGTERM, a SLURM job's preemption signal) stops training at a safe point.

The training loop turns a signal into a flag it polls between steps (``deferred``), so an
epoch is never half-written into a checkpoint and a second signal stops at once; the rest of
a job raises ``Interrupted`` at once (``raising``). What a sweep then does with an interrupted
job (marking its MLflow run KILLED, stopping workers, resuming) is ``fer_sweep.sweep``'s part.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    if in_submitit_job():
        return (*SIGNALS, preemption_signal())
    return SIGNALS


def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _handlers(handler: Callable[[int, Any], None]) -> Iterator[None]:
    if not on_main_thread():  # signals reach the main thread only (joblib's threading backend)
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


def in_submitit_job() -> bool:
    """A job that submitit started on a SLURM cluster (not the process that submitted it,
    even where that one runs inside an allocation)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def preemption_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before the time limit (``--signal``); USR2 unless
    SUBMITIT_PREEMPT_SIGNAL says otherwise, as in submitit."""
    return signal.Signals[f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}"]
