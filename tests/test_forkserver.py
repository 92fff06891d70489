"""The tests' warm interpreter (tests/forkserver.py): a forked ``python -m fer_sweep`` must be
indistinguishable from a started one in what the CLI tests read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import REPO, _cli_env
from tests.forkserver import Client, Forked

pytestmark = [
    pytest.mark.slow,  # fresh interpreters beside forked ones: not for the fast lane
    pytest.mark.skipif(conftest._FORK.broken, reason="FER_SWEEP_TEST_FORK=0"),
]

# A server of this module's own: what earlier tests did to the shared one (tests/conftest.py's
# _FORK) is not this module's subject.
_FORK = Client(str(REPO), _cli_env(None))


def _fresh(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fer_sweep", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=_cli_env(env),
        timeout=120,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["trainer.epochs=0"],  # a settings error: exit 2, one line on stderr
        ["trainer.epochs=abc"],
        ["-m", "trainer.epochs=1,0"],
    ],
)
def test_forked_cli_prints_and_exits_as_a_started_one(tmp_path: Path, args: list[str]) -> None:
    forked = _FORK.spawn("fer_sweep", args, str(tmp_path), _cli_env(None), False, False)
    assert isinstance(forked, Forked), _FORK.why
    out, err = forked.communicate(timeout=120)
    fresh = _fresh(args, tmp_path)
    assert (forked.returncode, out, err) == (fresh.returncode, fresh.stdout, fresh.stderr)


def test_cwd_environment_and_session_are_the_requests(tmp_path: Path) -> None:
    """The child runs in the given folder with the given environment (an MLflow variable picks
    the store), in a session of its own when asked, under its own pid."""
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    proc = conftest.start_cli(
        ["data=synthetic", "data.limit_per_class=2", "trainer.epochs=1", "trainer.progress=false"],
        tmp_path,
        env={"MLFLOW_TRACKING_URI": uri},
        new_session=True,
        client=_FORK,
    )
    assert isinstance(proc, Forked) and proc.pid != os.getpid()
    assert os.getpgid(proc.pid) == proc.pid  # its own process group, for os.killpg
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert (tmp_path / "env.db").is_file() and (tmp_path / "outputs").is_dir()


def test_signals_reach_the_child_and_its_status_says_so(tmp_path: Path) -> None:
    """SIGKILL from the test ends the child with -9, as Popen reports it."""
    proc = conftest.start_cli(
        ["data=synthetic", "trainer.epochs=50", "trainer.progress=false"],
        tmp_path,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'k.db'}"},
        client=_FORK,
    )
    assert isinstance(proc, Forked)
    time.sleep(1)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_an_interpreter_setting_gets_a_started_interpreter(tmp_path: Path) -> None:
    """A variable read at interpreter start (here PYTHONPATH) cannot be given to a forked
    child: run_cli starts an ordinary process instead, which honours it."""
    extra = tmp_path / "extra"
    extra.mkdir()
    env = {"PYTHONPATH": f"{extra}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    assert _FORK.spawn("fer_sweep", ["--help"], str(tmp_path), _cli_env(env), False, False) is None
    assert "PYTHONPATH" in _FORK.why
    assert conftest.run_cli(["--help"], tmp_path, env=env, client=_FORK).returncode == 0


def test_in_process_imports_do_not_turn_forking_off(tmp_path: Path) -> None:
    """Importing torchvision sets TORCHINDUCTOR_CACHE_DIR in the test process, which every CLI
    run inherits; a variable read only when used must not send runs to fresh interpreters."""
    import torchvision  # noqa: F401

    assert "TORCHINDUCTOR_CACHE_DIR" in os.environ
    forked = _FORK.spawn("fer_sweep", ["--help"], str(tmp_path), _cli_env(None), False, False)
    assert isinstance(forked, Forked), _FORK.why
    assert forked.communicate(timeout=60)[0]


def test_a_test_process_where_the_cli_tuning_ran_still_forks(tmp_path: Path) -> None:
    """core.runtime.tune() (run in-process by some tests) sets OMP_WAIT_POLICY=PASSIVE, which
    the server already has, as a started CLI would before torch loads."""
    from fer_sweep.core import runtime

    runtime.tune()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    forked = _FORK.spawn("fer_sweep", ["--help"], str(tmp_path), _cli_env(None), False, False)
    assert isinstance(forked, Forked), _FORK.why
    assert forked.communicate(timeout=60)[0]
    server_env = open(f"/proc/{_FORK.server.pid}/environ", "rb").read().split(b"\0")
    assert b"OMP_WAIT_POLICY=PASSIVE" in server_env


def test_intel_openmp_variables_do_not_turn_forking_off(tmp_path: Path) -> None:
    """Importing sklearn (Optuna's importances) or inductor sets KMP_* for an Intel OpenMP this
    torch does not load; seen in the full suite to send a worker's runs to fresh interpreters."""
    env = {"KMP_DUPLICATE_LIB_OK": "True", "KMP_INIT_AT_FORK": "FALSE"}
    forked = _FORK.spawn("fer_sweep", ["--help"], str(tmp_path), _cli_env(env), False, False)
    assert isinstance(forked, Forked), _FORK.why
    assert forked.communicate(timeout=60)[0]


def test_a_line_read_leaves_the_rest_to_communicate(tmp_path: Path) -> None:
    """A test reads the first lines as they come (stdout.readline), then the rest: together
    they are the whole output, as with Popen."""
    proc = conftest.start_cli(["--help"], tmp_path, client=_FORK)
    assert isinstance(proc, Forked), _FORK.why
    first = proc.stdout.readline()
    rest, _ = proc.communicate(timeout=120)
    fresh = _fresh(["--help"], tmp_path)
    assert first and first + rest == fresh.stdout + fresh.stderr
