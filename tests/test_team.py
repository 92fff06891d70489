"""A lab's shared server, for real (tests/team_server.py): PostgreSQL behind MLflow's basic-auth
tracking server for the runs, the same PostgreSQL for Optuna's study; logins from MLflow's
variables; sweeps with parallel workers, bad logins and permissions, restarts, and load.

CI installs PostgreSQL and the .[team] extra (.ci/run); a developer's machine without them
skips this module with the reason (CI's strict skips make a skip there a failure).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import one_error_line, run_cli, start_cli
from tests.team_server import ALICE, BOB, TeamServer, _env, load, team_server, unavailable

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("team_server"),  # one PostgreSQL and one MLflow server
    pytest.mark.skipif(bool(unavailable()), reason=unavailable() or ""),
]

TINY = [
    "data=synthetic",
    "data.limit_per_class=10",
    "trainer.progress=false",
    "mlflow.log_model=false",
    "mlflow.figures=false",
]
GRID = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "trainer.seed=0,1"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamServer]:
    with team_server(tmp_path_factory.mktemp("team")) as srv:
        yield srv


def _client(srv: TeamServer, user: str = ALICE):  # noqa: ANN202
    from mlflow.tracking import MlflowClient

    with _env(srv.env(user)):
        client = MlflowClient(srv.url)
        client.search_experiments(max_results=1)  # logs in now (the env is read per request)
    return client


def _runs(srv: TeamServer, experiment: str, role: str | None = None) -> list:
    with _env(srv.env(ALICE)):
        client = _client(srv)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if role is None or r.data.tags.get("fer_sweep.role") == role]


def _history(srv: TeamServer, run_id: str, key: str) -> list[int]:
    with _env(srv.env(ALICE)):
        return sorted(m.step for m in _client(srv).get_metric_history(run_id, key))


def test_sweep_and_search_log_everything_to_the_team_server(
    server: TeamServer, tmp_path: Path
) -> None:
    """A grid sweep of two joblib workers and an Optuna search of two workers whose study is
    in the same PostgreSQL: every run FINISHED under its parent with every epoch, the study's
    trial count exact; the report is built from the server; no password is written anywhere."""
    env = server.env(ALICE)
    grid = run_cli(
        [*GRID, *TINY, "trainer.epochs=3", "mlflow.experiment=team"], cwd=tmp_path, env=env
    )
    assert grid.returncode == 0, (grid.stdout + grid.stderr)[-3000:]
    (parent,) = _runs(server, "team", "parent")
    jobs = _runs(server, "team", "job")
    assert parent.info.status == "FINISHED" and len(jobs) == 2
    for run in jobs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        for key in ("train_loss", "val_loss", "val_acc", "lr"):
            assert _history(server, run.info.run_id, key) == [0, 1, 2], key

    storage = server.pg.url("optuna")  # its password comes from PGPASSWORD
    search = run_cli(
        [
            "-m",
            "hparams_search=cnn2_optuna",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.n_trials=4",
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=team_search",
            "trainer.threads=1",
            "trainer.epochs=2",
            *TINY,
            "mlflow.experiment=team-search",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert search.returncode == 0, (search.stdout + search.stderr)[-3000:]
    import optuna

    with _env(env):
        study = optuna.load_study(study_name="team_search", storage=storage)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == [0, 1, 2, 3]  # exactly n_trials, none twice
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    trial_runs = _runs(server, "team-search", "job")
    assert sorted(int(r.data.tags["fer_sweep.trial_number"]) for r in trial_runs) == numbers
    assert all(r.info.status == "FINISHED" for r in trial_runs)

    report = run_cli(
        ["--experiment", "team", "--out", str(tmp_path / "report")],
        cwd=tmp_path,
        module="fer_sweep.report",
        env=env,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert (tmp_path / "report" / "table2.md").read_text().count("cnn2") >= 1

    # No password in the store (params, tags, artifacts), the sweep folders or the logs.
    secrets = [server.passwords[ALICE], server.pg.password]
    with _env(env):
        client = _client(server)
        for run in [*_runs(server, "team"), *_runs(server, "team-search")]:
            text = json.dumps([run.data.params, run.data.tags])
            folder = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "a")))
            text += "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())
            assert not any(s in text for s in secrets), run.info.run_id
    files = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and "a" not in p.relative_to(tmp_path).parts[:1]
    ]
    assert any(p.name == "config.yaml" and ".hydra" in p.parts for p in files)
    for p in files:
        assert not any(s in p.read_text(errors="replace") for s in secrets), p
    for proc in (grid, search, report):
        assert not any(s in proc.stdout + proc.stderr for s in secrets)


def test_bad_logins_and_storage_are_one_line_before_any_run(
    server: TeamServer, tmp_path: Path
) -> None:
    """A wrong password, a reader who may not write, a study database that cannot be opened:
    exit 2, one line, and no run anywhere."""
    env = server.env(ALICE)
    setup = run_cli([*TINY, "trainer.epochs=1", "mlflow.experiment=shared"], cwd=tmp_path, env=env)
    assert setup.returncode == 0, setup.stderr[-3000:]
    exp_id = _runs(server, "shared")[0].info.experiment_id
    with _env(server.env("admin")):
        server.admin().grant_user_permission(BOB, "experiment", exp_id, "READ")
    before = {r.info.run_id for r in _runs(server, "shared")}

    wrong = server.env(ALICE, password="not-" + server.passwords[ALICE])
    for args in ([*TINY, "mlflow.experiment=shared"], [*GRID, *TINY, "mlflow.experiment=shared"]):
        proc = run_cli(args, cwd=tmp_path, env=wrong)
        one_error_line(proc, "refused the login of user alice", "401")
        proc = run_cli(args, cwd=tmp_path, env=server.env(BOB))
        one_error_line(proc, "user bob may not", "403", "EDIT permission")
    proc = run_cli(["--experiment", "shared"], cwd=tmp_path, module="fer_sweep.report", env=wrong)
    one_error_line(proc, "401")

    nodb = server.pg.url("no_such_db")
    proc = run_cli(
        [
            "-m",
            "hparams_search=cnn2_optuna",
            f"hydra.sweeper.storage={nodb}",
            *TINY,
            "mlflow.experiment=shared",
        ],
        cwd=tmp_path,
        env=env,
    )
    one_error_line(proc, "hydra.sweeper.storage=", "no_such_db")
    assert {r.info.run_id for r in _runs(server, "shared")} == before  # nothing created


def test_restarts_of_the_server_and_the_database_lose_nothing(
    server: TeamServer, tmp_path: Path
) -> None:
    """The tracking server and PostgreSQL restart while a two-job sweep trains: it rides them
    out or stops cleanly, and sweep.resume=latest finishes it with each epoch logged once."""
    args = [*GRID, *TINY, "trainer.epochs=12", "mlflow.experiment=faults"]
    env = server.env(ALICE)
    proc = start_cli(args, tmp_path, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        jobs = _runs(server, "faults", "job")
        if jobs and all(len(_history(server, r.info.run_id, "val_acc")) >= 2 for r in jobs):
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    server.stop()
    time.sleep(2)
    server.start()
    server.pg.stop()
    time.sleep(2)
    server.pg.start()
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:  # stopped cleanly: the same command finishes it
        assert "Traceback" not in out or "sweep.resume=latest" in out, out[-3000:]
        again = run_cli([*args, "sweep.resume=latest"], cwd=tmp_path, env=env)
        assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    (parent,) = _runs(server, "faults", "parent")
    assert parent.info.status == "FINISHED"
    done = [r for r in _runs(server, "faults", "job") if r.info.status == "FINISHED"]
    assert sorted(r.data.params["trainer.seed"] for r in done) == ["0", "1"]
    for run in done:
        for key in ("train_loss", "val_acc", "lr"):
            assert _history(server, run.info.run_id, key) == list(range(12)), key


def test_eight_writers_at_once_lose_no_metric(server: TeamServer) -> None:
    import os

    with _env(server.env(ALICE)):
        exp_id = _client(server).create_experiment("load")
    env = {**os.environ, **server.env(ALICE)}
    results = load(server.url, env, exp_id)
    assert len({r for r, _ in results}) == 8
    for run_id, _ in results:
        for key in ("train_loss", "val_acc", "epoch_seconds"):
            assert _history(server, run_id, key) == list(range(100)), (run_id, key)
