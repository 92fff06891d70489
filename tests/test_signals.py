"""SIGTERM at any moment of a run or a sweep leaves nothing RUNNING in MLflow (issue: a
preempted job, a closed laptop, a Ctrl-C between jobs). Each test starts the real CLI, waits
for a moment of its life that the store or the log shows, and sends the signal then."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from fer_sweep.core import interrupt
from fer_sweep.sweep import signals, tracking
from tests.conftest import migrated_store, start_cli, tiny_run
from tests.forkserver import Forked

pytestmark = pytest.mark.slow  # every test here starts the CLI

TINY = tiny_run(limit_per_class=20, epochs=None, figures=True, synthetic=True)

# Two jobs at once in joblib worker processes (a pool that outlives its jobs).
JOBLIB_PAIR = [
    "-m",
    "hydra/launcher=joblib",
    "hydra.launcher.n_jobs=2",
    "trainer.threads=1",
    "trainer.seed=0,1",
    *TINY,
    "mlflow.figures=false",
]


def _start(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, group: bool = False
) -> subprocess.Popen[str] | Forked:
    """The CLI (stdout and stderr together); ``group``: in a process group of its own, as a
    terminal's job is."""
    uri = migrated_store(cwd / "m.db")
    MlflowClient(uri).search_experiments()  # the store exists before we poll it
    return start_cli([*args, f"mlflow.tracking_uri={uri}"], cwd, env, new_session=group)


def _runs(cwd: Path) -> list:
    client = MlflowClient(f"sqlite:///{cwd / 'm.db'}")
    exp = client.get_experiment_by_name("fer_sweep")
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def _wait(cond: Callable[[], bool], proc: subprocess.Popen, what: str, limit: float = 300) -> None:
    deadline = time.time() + limit
    while time.time() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            pytest.fail(f"the command ended before {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"never reached {what}")


def _finish(proc: subprocess.Popen, cwd: Path) -> tuple[int, str, list]:
    out, _ = proc.communicate(timeout=120)
    runs = _runs(cwd)
    assert not [r for r in runs if r.info.status == "RUNNING"], out[-3000:]
    return proc.returncode, out, runs


def _job_runs(runs: list) -> list:
    return [r for r in runs if r.data.tags.get("fer_sweep.role") == "job"]


def _parent(runs: list):
    (parent,) = [r for r in runs if r.data.tags.get("fer_sweep.role") == "parent"]
    return parent


def test_during_data_loading(tmp_path: Path) -> None:
    # A fresh cache: the synthetic faces are drawn and decoded first (about a second).
    env = {"FER_SWEEP_CACHE": str(tmp_path / "cache")}
    proc = _start(["-m", "trainer.seed=0,1", "trainer.epochs=1", *TINY], tmp_path, env)
    lines: list[str] = []

    def loading() -> bool:
        line = proc.stdout.readline()
        lines.append(line)
        return "precision" in line  # logged right before the data are loaded

    _wait(loading, proc, "data loading")
    proc.send_signal(signal.SIGTERM)
    code, out, runs = _finish(proc, tmp_path)
    assert code == 143, "".join(lines) + out
    assert _parent(runs).info.status == "KILLED"
    assert "sweep.resume=" in out


def test_between_two_jobs(tmp_path: Path) -> None:
    proc = _start(
        ["-m", "trainer.seed=0,1,2,3", "trainer.epochs=1", *TINY, "mlflow.figures=false"], tmp_path
    )
    _wait(
        lambda: any(r.info.status == "FINISHED" for r in _job_runs(_runs(tmp_path))),
        proc,
        "the first finished job",
    )
    proc.send_signal(signal.SIGTERM)
    code, out, runs = _finish(proc, tmp_path)
    assert code == 143, out[-3000:]
    assert _parent(runs).info.status == "KILLED"
    assert len(_job_runs(runs)) < 4  # the sweep stopped


def test_during_the_artifact_upload(tmp_path: Path) -> None:
    proc = _start(["trainer.epochs=1", *TINY], tmp_path)  # figures on: a second or two
    _wait(
        lambda: any("test_acc" in r.data.metrics for r in _runs(tmp_path)),
        proc,
        "the test metrics (logged right before the artifacts)",
    )
    proc.send_signal(signal.SIGTERM)
    code, out, runs = _finish(proc, tmp_path)
    (run,) = runs
    # Either the signal came while artifacts were written (KILLED, 143), or the run had just
    # finished them (FINISHED, 0): never RUNNING.
    assert (code, run.info.status) in ((143, "KILLED"), (0, "FINISHED")), out[-3000:]


def test_inside_a_joblib_worker(tmp_path: Path) -> None:
    proc = _start(
        [*JOBLIB_PAIR, "trainer.epochs=50"],
        tmp_path,
    )

    def training() -> bool:
        client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
        return any(
            client.get_metric_history(r.info.run_id, "val_acc") for r in _job_runs(_runs(tmp_path))
        )

    _wait(training, proc, "a worker's first epoch")
    worker = next(
        r
        for r in _job_runs(_runs(tmp_path))
        if MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_metric_history(
            r.info.run_id, "val_acc"
        )
    )
    os.kill(int(worker.data.tags["fer_sweep.pid"]), signal.SIGTERM)
    code, out, runs = _finish(proc, tmp_path)
    assert code != 0, out[-3000:]
    statuses = {r.info.run_id: r.info.status for r in runs}
    assert statuses[worker.info.run_id] == "KILLED"
    assert _parent(runs).info.status == "KILLED"


def test_two_signals_to_the_whole_sweep_still_mark_everything_and_leave_no_worker(
    tmp_path: Path,
) -> None:
    """`pkill -f` / a terminal's Ctrl-C reach the launcher AND its joblib workers, and people
    press twice: the parent and every job end KILLED, and no pool worker trains on."""
    proc = _start(
        [*JOBLIB_PAIR, "trainer.epochs=200"],
        tmp_path,
        group=True,
    )

    def both_training() -> bool:
        client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
        jobs = _job_runs(_runs(tmp_path))
        return len(jobs) == 2 and all(
            client.get_metric_history(r.info.run_id, "val_acc") for r in jobs
        )

    _wait(both_training, proc, "both workers' first epochs")
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGTERM)
    code, out, runs = _finish(proc, tmp_path)  # nothing RUNNING
    assert code == 143, out[-3000:]
    assert _parent(runs).info.status == "KILLED"
    assert {r.info.status for r in _job_runs(runs)} == {"KILLED"}
    time.sleep(1.0)
    assert _group_members(proc.pid) == [], "a worker of the ended sweep lives on"


def _group_members(pgid: int) -> list[str]:
    """Processes of a process group that are not zombies (an exited worker waits for pid 1 to
    reap it), as "pid state command"."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
            out.append(f"{stat.parent.name} {fields[0]} {cmd}")
    return out


def test_a_signal_that_a_library_turned_into_its_own_error_is_still_a_signal() -> None:
    """SIGTERM inside an MLflow sqlite write comes back as MlflowException("This transaction
    is closed"), raised from the rollback the signal interrupted: the job must still see the
    signal (run KILLED, exit 143), not a failure (the CI saw FAILED, exit 1, under load)."""

    def write_interrupted_by_sigterm() -> None:
        try:
            raise interrupt.Interrupted(signal.SIGTERM, "artifacts")
        except BaseException:
            raise RuntimeError("This transaction is closed")  # noqa: B904 (as SQLAlchemy does)

    with pytest.raises(ValueError) as caught:
        try:
            write_interrupted_by_sigterm()
        except RuntimeError as err:
            raise ValueError("MlflowException: This transaction is closed") from err
    found = interrupt.interruption(caught.value)
    assert isinstance(found, interrupt.Interrupted) and interrupt.exit_status(found) == 143
    assert interrupt.interruption(ValueError("a plain failure")) is None
    assert interrupt.interruption(KeyboardInterrupt()) is not None


GUARDED = """
import sys, time
from fer_sweep.sweep.signals import SweepGuard

SweepGuard(lambda signum: print("parent marked", signum, file=sys.stderr), grace=1).install()
print("ready", flush=True)
try:  # like OmegaConf's flag_override, whose clean-up fails when a signal cut it short
    time.sleep(60)
finally:
    raise AttributeError("'NoneType' object has no attribute '_invalidate_flags_cache'")
"""


def test_the_sweep_guard_exits_143_wherever_the_signal_lands(tmp_path: Path) -> None:
    """A SIGTERM between jobs can land inside Hydra composing the next job, whose clean-up would
    replace an exception raised by the guard with its own error (exit 1): the guard marks the
    parent and exits 143 itself."""
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "parent marked 15" in err and "AttributeError" not in err


WAITING = r"""
import subprocess, sys, time
from fer_sweep.sweep.signals import SweepGuard

IGNORES = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True);"
    " time.sleep(300)"
)
ACTS = (  # a worker marking its run: a second's work after the signal, then exit
    "import signal, sys, time\n"
    "def stop(*_):\n    time.sleep(1); open(sys.argv[1], 'w').write('marked'); sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, stop)\nprint('up', flush=True)\ntime.sleep(300)"
)
tracker = subprocess.Popen([sys.executable, "-c", IGNORES], stdout=subprocess.PIPE)
tracker.stdout.readline()
worker = subprocess.Popen([sys.executable, "-c", ACTS, sys.argv[1]], stdout=subprocess.PIPE)
worker.stdout.readline()
SweepGuard(lambda signum: print("parent marked", signum, file=sys.stderr), grace=120).install()
print(tracker.pid, flush=True)  # only once the guard is in place: the test signals right away
time.sleep(300)
"""


def test_the_guard_waits_for_workers_but_not_for_processes_that_ignore_the_signal(
    tmp_path: Path,
) -> None:
    """multiprocessing's and loky's resource trackers ignore SIGTERM: the guard waits for the
    workers that act on it (here one that takes a second to mark its run), not for those, and
    kills what is left (before: every interrupted joblib sweep sat out the 30 s grace)."""
    script, marked = tmp_path / "waiting.py", tmp_path / "marked"
    script.write_text(WAITING)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marked)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    tracker = int(proc.stdout.readline())
    assert signals.ignores(tracker, signal.SIGTERM)
    assert not signals.ignores(proc.pid, signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)  # not the 120 s grace
    assert proc.returncode == 143 and "parent marked 15" in err, err
    assert marked.read_text() == "marked"  # the acting worker was waited for
    time.sleep(0.2)
    assert not signals.alive(tracker)  # the ignoring one was killed, not left behind


def _open_sweep_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[MlflowClient, str]:
    """A sweep's parent run as on_multirun_start leaves it: RUNNING in a real store, named in
    the sweep dir's parent file and in the launcher's list of open parents."""
    uri = migrated_store(tmp_path / "m.db")
    client = MlflowClient(uri)
    exp_id = client.create_experiment("fer_sweep")
    parent = client.create_run(exp_id).info.run_id
    info = {
        "tracking_uri": uri,
        "experiment": "fer_sweep",
        "experiment_id": exp_id,
        "parent_run_id": parent,
        "launcher_pid": os.getpid(),
        "launcher_host": socket.gethostname(),
    }
    (tmp_path / tracking.PARENT_FILE).write_text(json.dumps(info))
    monkeypatch.setitem(tracking._open_parents, parent, uri)
    return client, parent


def test_a_parent_the_guard_could_not_mark_killed_is_marked_failed_before_it_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard ends the process with os._exit, which skips the at-exit FAILED marking: when
    marking the parent KILLED fails (a store hiccup), the guard's action marks it FAILED itself,
    so no sweep is left RUNNING."""
    client, parent = _open_sweep_parent(tmp_path, monkeypatch)
    real_close, calls = tracking.close_parent, []

    def flaky_close(*args: Any, **kwargs: Any) -> None:
        calls.append(args[2])
        if len(calls) == 1:
            raise ConnectionError("store unreachable")
        real_close(*args, **kwargs)

    monkeypatch.setattr(tracking, "close_parent", flaky_close)
    with pytest.raises(ConnectionError):
        tracking.stop_interrupted_sweep(tmp_path)
    run = client.get_run(parent)
    assert calls == ["KILLED", "FAILED"]
    assert run.info.status == "FAILED"
    assert "stopped before its end" in run.data.tags["fer_sweep.error"]
    assert parent not in tracking._open_parents


def test_the_guard_marks_a_parent_killed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual case: marked KILLED, and the fallback finds nothing left to mark."""
    client, parent = _open_sweep_parent(tmp_path, monkeypatch)
    tracking.stop_interrupted_sweep(tmp_path)
    assert client.get_run(parent).info.status == "KILLED"
    assert parent not in tracking._open_parents
