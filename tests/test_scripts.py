"""The measurement scripts' own small pieces (scripts/ is not a package: loaded by path)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from tests.conftest import REPO


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pruning_benchmark_prints_a_dash_for_a_best_trial_without_test_accuracy() -> None:
    bench = _script("pruning_benchmark")
    summary = {"trials": 6, "states": "{}", "epochs_trained": 40, "best_val_acc": 0.51}
    pruned = bench.table_row("asha", "asha", {**summary, "best_test_acc": None})
    assert pruned.endswith("| 51.00 % | — |") and "0.00 %" not in pruned
    done = bench.table_row("unpruned", "none", {**summary, "best_test_acc": 0.5})
    assert done.endswith("| 51.00 % | 50.00 % |")


FAKE_TRAINING = r"""#!/usr/bin/env bash
# stands in for `python -m fer_sweep` (hours per row): opens the sweep folder's parent file as a
# real sweep does (its parent run: a digest of the folder), notes its overrides, then sleeps
# until done or SIGTERM
trap 'kill $!; echo TERM >>"$CALLS"; exit 143' TERM
for a in "$@"; do
    case $a in hydra.sweep.dir=*) d=${a#hydra.sweep.dir=}; d=${d%%/\$*} ;; esac
done
mkdir -p "$d/x"
id=$(echo "$d" | md5sum | cut -c1-32)
echo "{\"tracking_uri\": \"x\", \"parent_run_id\": \"$id\"}" >"$d/x/mlflow_parent.json"
echo "$*" >>"$CALLS"
sleep "${FAKE_SLEEP:-0}" & wait $!
exit "${FAKE_RC:-0}"
"""


def _digest(folder: str) -> str:
    return hashlib.md5(f"{folder}\n".encode()).hexdigest()


def _start_long_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """scripts/table2_long.sh, copied into tmp_path as a repo root, started with the stand-in."""
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(REPO / "scripts" / "table2_long.sh", tmp_path / "scripts")
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_TRAINING)
    fake.chmod(0o755)
    full = {**os.environ, "PYTHON": str(fake), "CALLS": str(tmp_path / "calls"), **env}
    return subprocess.run(
        ["bash", "scripts/table2_long.sh"], cwd=tmp_path, env=full, capture_output=True, text=True
    )


def _long_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """_start_long_run, then wait for its end (after a SIGTERM where FAKE_SLEEP is set)."""
    started = _start_long_run(tmp_path, **env)
    assert started.returncode == 0 and "started pid" in started.stdout, started.stderr
    pid = int((tmp_path / "runs/table2/pid").read_text())
    if env.get("FAKE_SLEEP"):
        _wait_for(lambda: (tmp_path / "calls").exists())
        os.kill(pid, signal.SIGTERM)
    _wait_for(lambda: _ended(pid) and _unlocked(tmp_path / "runs/table2/lock"))
    return started


def _ended(pid: int) -> bool:
    """Gone, or a zombie (this VM's init reaps orphans late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _unlocked(lock: Path) -> bool:
    """The runner and its training have ended: the lock they hold is free."""
    return subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0


def _wait_for(cond: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_table2_long_runs_the_rows_then_the_seeds_each_resumed_in_its_own_sweep(
    tmp_path: Path,
) -> None:
    """The rows' multirun first; once it ends cleanly, row 6 with seeds 1 and 2; a stage whose
    sweep folder exists is resumed under its own parent; SIGTERM stops the training, a failure
    stops the stages; while one runs, a second call starts nothing."""
    calls, table2 = tmp_path / "calls", tmp_path / "runs" / "table2"
    rows, seeds = _digest("runs/table2/multirun"), _digest("runs/table2/seeds")

    _long_run(tmp_path, FAKE_SLEEP="60")  # stopped with SIGTERM: no stage done, no seeds
    lines = calls.read_text().splitlines()
    assert lines[-1] == "TERM" and len(lines) == 2, lines
    assert "table2=row5,row6,row7" in lines[0] and "sweep.resume" not in lines[0]
    assert not list(table2.glob("*.done"))

    _long_run(tmp_path, FAKE_RC="1")  # the rows fail: resumed, not marked done, no seeds
    lines = calls.read_text().splitlines()[2:]
    assert len(lines) == 1 and lines[0].endswith(f"sweep.resume={rows}"), lines
    assert not list(table2.glob("*.done"))

    _long_run(tmp_path)  # the rows end: the seeds start afresh, in a sweep folder of their own
    lines = calls.read_text().splitlines()[3:]
    assert "table2=row5,row6,row7" in lines[0] and lines[0].endswith(f"sweep.resume={rows}")
    assert "table2=row6 trainer.seed=1,2" in lines[1] and "sweep.resume" not in lines[1]
    assert "hydra.sweep.dir=runs/table2/seeds/" in lines[1] and len(lines) == 2
    assert (table2 / "rows.done").read_text() == "experiment=table2 table2=row5,row6,row7\n"
    assert (table2 / "seeds.done").exists()

    _long_run(tmp_path, SEEDS="3,4")  # other seeds: finished rows not run again, seeds resumed
    lines = calls.read_text().splitlines()[5:]
    assert len(lines) == 1 and "trainer.seed=3,4" in lines[0], lines
    assert lines[0].endswith(f"sweep.resume={seeds}")
    log = sorted(table2.glob("log-*.txt"))[-1].read_text()
    assert log.rstrip().endswith("all stages done"), log


def test_table2_long_keeps_the_rows_its_store_began_with(tmp_path: Path) -> None:
    """ROWS=row6,row7 once (row 5 already done elsewhere): every later call continues those
    rows, not the default three, which sweep.resume would refuse as another sweep."""
    calls, rows = tmp_path / "calls", _digest("runs/table2/multirun")
    _long_run(tmp_path, ROWS="row6,row7", FAKE_SLEEP="60")
    _long_run(tmp_path, SEEDS="")
    lines = [line for line in calls.read_text().splitlines() if line != "TERM"]
    assert "table2=row6,row7 " in lines[0] + " " and "sweep.resume" not in lines[0], lines
    assert "table2=row6,row7 " in lines[1] and lines[1].endswith(f"sweep.resume={rows}"), lines
    done = (tmp_path / "runs" / "table2" / "rows.done").read_text()
    assert done == "experiment=table2 table2=row6,row7\n"
    other = _start_long_run(tmp_path, ROWS="row5,row6,row7")  # refused, one line, nothing run
    assert other.returncode == 2 and "began with row6,row7" in other.stderr, other.stderr
    assert len(calls.read_text().splitlines()) == len(lines) + 1  # + the first call's TERM


def test_table2_long_starts_nothing_while_its_training_runs(tmp_path: Path) -> None:
    """Even with its runner killed outright, the training it started holds the lock."""
    assert _start_long_run(tmp_path, FAKE_SLEEP="60").returncode == 0
    _wait_for(lambda: (tmp_path / "calls").exists())
    os.kill(int((tmp_path / "runs/table2/pid").read_text()), signal.SIGKILL)
    again = _start_long_run(tmp_path, FAKE_SLEEP="60")
    assert again.stdout.startswith("already running"), again.stdout + again.stderr
    assert len((tmp_path / "calls").read_text().splitlines()) == 1
    subprocess.run(["pkill", "-TERM", "-f", str(tmp_path / "fake_python")])
    _wait_for(lambda: _unlocked(tmp_path / "runs/table2/lock"))


def test_table2_long_runner_is_not_changed_by_an_edit_of_its_script(tmp_path: Path) -> None:
    """The script is edited (a pull, a fix) while its runner trains for hours: the runner goes
    on with the script it started with (bash would read the edited file from its old offset)."""
    started = _start_long_run(tmp_path, FAKE_SLEEP="4", SEEDS="")
    assert started.returncode == 0, started.stderr
    _wait_for(lambda: (tmp_path / "calls").exists())
    script = tmp_path / "scripts" / "table2_long.sh"
    text = script.read_text()
    head = text.index("set -euo pipefail")
    script.write_text(text[:head] + "# an added comment line\n" * 40 + text[head:])
    _wait_for(lambda: _unlocked(tmp_path / "runs/table2/lock"))
    table2 = tmp_path / "runs" / "table2"
    log = sorted(table2.glob("log-*.txt"))[-1].read_text()
    assert log.rstrip().endswith("all stages done"), log
    assert (table2 / "rows.done").read_text() == "experiment=table2 table2=row5,row6,row7\n"
