"""A run registered as a photo model (python -m fer_sweep.serve) and served by the real
`mlflow models serve`: a POST of real photos returns their faces; a request that is not a photo
or lacks the column gets a 400 with the reason, and the server goes on serving."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli, runs_with_models
from tests.mlflow_server import free_port
from tests.test_faces import PORTRAIT, broken_png, two_portraits

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serve")]
ENSEMBLE: dict = {}  # the store of the served fixture's two runs


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cwd = tmp_path_factory.mktemp("serve")
    uri = runs_with_models(cwd, seeds=2)
    ENSEMBLE.update(cwd=cwd, uri=uri)
    ended = {r.info.run_id: (r.info.status, r.info.end_time) for r in _all_runs(uri)}
    reg = run_cli(
        ["--run-id", "best", "--tracking-uri", uri, "--name", "fer-faces"],
        cwd=cwd,
        module="fer_sweep.serve",
    )
    assert reg.returncode == 0 and "models:/fer-faces/1" in reg.stdout, reg.stderr[-3000:]
    # the registered run is still the finished run it was, its end time too (reports, bundles)
    assert {r.info.run_id: (r.info.status, r.info.end_time) for r in _all_runs(uri)} == ended
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    log = (cwd / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/fer-faces/1",
         "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert server.poll() is None, (cwd / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):  # noqa: S310
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _all_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_a_served_model_finds_the_faces_of_posted_photos(served: str, tmp_path: Path) -> None:
    two = two_portraits(tmp_path / "two.jpg")
    body = {"dataframe_split": {"columns": ["image"], "data": [[_b64(two)], [_b64(PORTRAIT)]]}}
    status, out = _post(served, body)
    assert status == 200, out
    faces = out["predictions"]
    assert [(f["row"], f["face"]) for f in faces] == [(0, 0), (0, 1), (1, 0)]
    for f in faces:
        assert f["emotion"] in ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
        assert 150 < f["width"] < 260 and f["height"] == f["width"]
    # the same through dataframe_records
    status, out = _post(served, {"dataframe_records": [{"image": _b64(PORTRAIT)}]})
    assert status == 200 and len(out["predictions"]) == 1
    # and through "inputs", as columns and as records
    for inputs in ({"image": [_b64(PORTRAIT)]}, [{"image": _b64(PORTRAIT)}]):
        status, out = _post(served, {"inputs": inputs})
        assert status == 200 and len(out["predictions"]) == 1, out


def test_bad_requests_get_400_and_the_server_goes_on(served: str, tmp_path: Path) -> None:
    status, out = _post(served, {"dataframe_split": {"columns": ["photo"], "data": [["x"]]}})
    assert status == 400 and "column 'image'" in out["message"], out
    junk = base64.b64encode(b"this is not a photo").decode()
    status, out = _post(served, {"dataframe_records": [{"image": junk}]})
    assert status == 400 and "row 0: not a photo" in out["message"], out
    broken = base64.b64encode(broken_png(tmp_path / "broken.png").read_bytes()).decode()
    status, out = _post(served, {"dataframe_records": [{"image": broken}]})
    assert status == 400 and "row 0: not a photo" in out["message"], out
    status, out = _post(served, {"dataframe_records": [{"image": "%%% not base64"}]})
    assert status == 400 and "not base64" in out["message"], out
    status, out = _post(served, {"dataframe_records": [{"image": _b64(PORTRAIT)}]})
    assert status == 200 and len(out["predictions"]) == 1  # still serving


def test_an_ensemble_registers_as_one_model_of_its_members(served: str, tmp_path: Path) -> None:
    """fer_sweep.ensemble's run registered: one pyfunc with each member's ONNX inside, whose
    probabilities are the members' mean (as predict --faces computes it from PyTorch)."""
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    cwd, uri = ENSEMBLE["cwd"], ENSEMBLE["uri"]
    made = run_cli(["--tracking-uri", uri, "--top-k", "2"], cwd=cwd, module="fer_sweep.ensemble")
    assert made.returncode == 0, made.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    (ens,) = [
        r
        for r in MlflowClient(uri).search_runs(["1"])
        if r.data.tags.get("fer_sweep.role") == "ensemble"
    ]
    reg = run_cli(
        ["--run-id", ens.info.run_id, "--tracking-uri", uri, "--name", "fer-ensemble"],
        cwd=cwd,
        module="fer_sweep.serve",
    )
    assert reg.returncode == 0 and "an ensemble of 2" in reg.stdout, reg.stderr[-3000:]
    # export takes one training run: an ensemble's is refused in one line that says what to do
    one = run_cli(
        ["--run-id", ens.info.run_id, "--tracking-uri", uri], cwd=cwd, module="fer_sweep.export"
    )
    assert one.returncode == 2 and "is an ensemble: export takes one training run" in one.stderr
    assert "Traceback" not in one.stderr and not list(cwd.glob("*.onnx"))
    from fer_sweep.sweep.store import use_store

    use_store(uri)  # MLflow's registry URI for this process, the environment left as it was
    model = mlflow.pyfunc.load_model("models:/fer-ensemble/1")
    (face,) = model.predict(pd.DataFrame({"image": [_b64(PORTRAIT)]})).to_dict("records")
    proc = run_cli(
        ["--run-id", ens.info.run_id, "--tracking-uri", uri, "--faces", str(PORTRAIT),
         "--format", "jsonl"],
        cwd=cwd,
        module="fer_sweep.predict",
    )  # fmt: skip
    (ref,) = [json.loads(line) for line in proc.stdout.splitlines()]
    classes = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    assert np.allclose([face[c] for c in classes], [ref[c] for c in classes], atol=2e-2)
    assert (face["x"], face["width"]) == (ref["x"], ref["width"])
