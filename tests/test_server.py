"""Logging to a real `mlflow server` over HTTP, artifacts included; unreachable ones fail fast.

The server is started by ``python -m fer_sweep.ui`` (``mlflow server --serve-artifacts``) on
127.0.0.1; everything is read back through its REST API with urllib, as another team member's
machine would see it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import JOB_ARTIFACTS, run_cli
from tests.mlflow_server import EXPERIMENT, SWEEP_MODELS, Server, free_port, shared_server, sweep_on

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mlflow_server")]  # one shared server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with shared_server(tmp_path_factory) as srv:
        yield srv


@pytest.fixture(scope="module")
def runs(server: Server, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The runs of the two-job sweep, as the REST API returns them."""
    sweep = sweep_on(server, tmp_path_factory)
    assert sweep.proc.returncode == 0, sweep.proc.stderr[-4000:] + server.log_tail(2000)
    exp = server.get_json("/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT)
    found = server.post_json(
        "/api/2.0/mlflow/runs/search",
        {"experiment_ids": [exp["experiment"]["experiment_id"]], "max_results": 100},
    )
    return found.get("runs", [])


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _metrics(run: dict[str, Any]) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def test_sweep_is_one_parent_with_two_finished_children(runs: list[dict[str, Any]]) -> None:
    parents = [r for r in runs if _tags(r).get("fer_sweep.role") == "parent"]
    children = [r for r in runs if _tags(r).get("fer_sweep.role") == "job"]
    assert len(parents) == 1 and len(children) == 2, [r["info"]["run_name"] for r in runs]
    parent_id = parents[0]["info"]["run_id"]
    assert parents[0]["info"]["status"] == "FINISHED"
    assert {_tags(r)["model"] for r in children} == set(SWEEP_MODELS)
    for run in children:
        assert run["info"]["status"] == "FINISHED"
        assert _tags(run)["mlflow.parentRunId"] == parent_id
        assert f"model={_tags(run)['model']}" in _tags(run)["overrides"]
        assert 0.0 <= _metrics(run)["test_acc"] <= 1.0
    assert _metrics(parents[0])["jobs"] == 2


def test_artifacts_are_uploaded_to_the_server(server: Server, runs: list[dict[str, Any]]) -> None:
    """Proxied artifact storage: the jobs upload through HTTP; nothing lands in their folder."""
    run = next(r for r in runs if _tags(r).get("model") == "cnn2")
    run_id = run["info"]["run_id"]
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:"), run["info"]
    listing = server.get_json("/api/2.0/mlflow/artifacts/list", run_id=run_id)
    names = {f["path"] for f in listing["files"]}
    assert JOB_ARTIFACTS | {"data.json"} <= names, names

    config = server.get("/get-artifact", path="config.yaml", run_uuid=run_id).decode()
    assert "name: cnn2" in config and "epochs: 1" in config
    png = server.get("/get-artifact", path="curves.png", run_uuid=run_id)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    npz = np.load(io.BytesIO(server.get("/get-artifact", path="predictions.npz", run_uuid=run_id)))
    assert npz["test_probs"].shape == (len(npz["test_y"]), 7)
    np.testing.assert_allclose(npz["test_probs"].sum(axis=1), 1.0, atol=1e-4)

    stored = [p.relative_to(server.root) for p in (server.root / "artifacts").rglob("*.yaml")]
    assert any(run_id in p.parts for p in stored), stored
    assert not (server.sweep.cwd / "mlruns").exists()  # type: ignore[union-attr]


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as the kernel writes them) that listen on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if Path(table).exists():
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(addr)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_ui_listens_on_loopback_only_by_default(server: Server) -> None:
    """The UI has no login: without --host it must not be reachable from other machines."""
    port = int(server.url.rsplit(":", 1)[1])
    assert _listening(port) == {"0100007F"}  # 127.0.0.1, and nothing else


def test_ui_names_a_taken_port(server: Server, tmp_path: Path) -> None:
    port = server.url.rsplit(":", 1)[1]
    proc = run_cli(["--port", port], cwd=tmp_path, timeout=60, module="fer_sweep.ui")
    assert proc.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in proc.stderr, proc.stderr


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "multirun"])
def test_unreachable_server_fails_before_training(
    tmp_path: Path, data_overrides: list[str], multirun: bool
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    args = [
        "model=cnn2",
        "trainer.epochs=1",
        "data.limit_per_class=5",
        "trainer.progress=false",
        f"mlflow.tracking_uri={uri}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *data_overrides,
    ]
    proc = run_cli(["-m", *args] if multirun else args, cwd=tmp_path, timeout=60)
    assert proc.returncode != 0
    assert f"cannot reach the MLflow tracking server at {uri}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "Dataset:" not in proc.stdout + proc.stderr  # failed before reading any data
    assert not (tmp_path / "sweep" / "0").exists()  # no job of the sweep started
