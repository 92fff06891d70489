"""Which run a job continues (fer_sweep.sweep.identity): by its settings' hash, or, where the
hash is older code's, by the settings the run logged as params."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from fer_sweep.sweep.identity import HASH_TAG, _hash, same_run
from fer_sweep.sweep.job import _where_it_trains_now
from fer_sweep.sweep.store import newest_runs
from fer_sweep.sweep.tracking import git_commit
from tests.conftest import migrated_store

FLAT = {
    "model.name": "resnet",
    "trainer.seed": "0",
    "optimizer.lr": "0.01",
    "trainer.epochs": "100",
}


def _run(params: dict[str, str], hash_: str = "older-code-hash") -> SimpleNamespace:
    return SimpleNamespace(
        info=SimpleNamespace(run_id="r1"),
        data=SimpleNamespace(tags={HASH_TAG: hash_}, params=params),
    )


def test_the_same_hash_is_the_same_run() -> None:
    assert same_run(_run({}, _hash(FLAT)), FLAT)


def test_a_setting_added_since_the_run_started_keeps_it_the_same_run() -> None:
    started = {k: v for k, v in FLAT.items() if k != "trainer.epochs"}  # it did not exist then
    extra = {"trainer.precision": "bf16", "data.n_train": "22968"}  # params beside the config
    assert same_run(_run({**started, **extra}), FLAT)


def test_a_changed_setting_is_another_run() -> None:
    assert not same_run(_run({**FLAT, "optimizer.lr": "0.1"}), FLAT)
    assert not same_run(_run({**FLAT, "trainer.epochs": "50"}), FLAT)


def test_a_run_without_its_params_is_never_taken() -> None:
    assert not same_run(_run({}), FLAT)  # killed before its params were logged
    assert not same_run(_run({"trainer.epochs": "100"}), FLAT)


def test_every_earlier_run_of_a_big_grid_is_searched(tmp_path: Path) -> None:
    """sweep.resume looks among ALL of a parent's runs, page by page: in a grid of more jobs
    than one page holds, the oldest would otherwise be trained again."""
    client = MlflowClient(migrated_store(tmp_path / "m.db"))
    exp = client.create_experiment("grid")
    made = [client.create_run(exp, start_time=1000 + i).info.run_id for i in range(7)]
    newest_first = made[::-1]
    assert [r.info.run_id for r in newest_runs(client, exp, "", None, page_size=3)] == newest_first
    assert [r.info.run_id for r in newest_runs(client, exp, "", 5, page_size=2)] == newest_first[:5]
    assert [r.info.run_id for r in newest_runs(client, exp, "", 2)] == newest_first[:2]


def test_a_resumed_run_names_where_and_with_which_code_it_trained(tmp_path: Path) -> None:
    client = MlflowClient(migrated_store(tmp_path / "m.db"))
    exp = client.create_experiment("resumed")
    tags = {"git_commit": "0" * 40, "fer_sweep.host": "elsewhere", "fer_sweep.pid": "1"}
    run_id = client.create_run(exp, tags=tags).info.run_id
    now = git_commit()
    for _ in range(2):  # resumed twice by this code: its commit listed once
        _where_it_trains_now(client, run_id)
        got = client.get_run(run_id).data.tags
        assert got["fer_sweep.pid"] == str(os.getpid())
        assert got["fer_sweep.host"] == socket.gethostname()
        assert got["fer_sweep.git_commits"] == ",".join(["0" * 40] + ([now] if now else []))
