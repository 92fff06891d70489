"""ONNX export (python -m fer_sweep.export) and prediction from the file with onnxruntime alone
(python -m fer_sweep.predict --onnx), against a real trained run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli, runs_with_models

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("onnx")]  # one trained run, shared


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    cwd = tmp_path_factory.mktemp("onnx")
    uri = runs_with_models(cwd)
    from mlflow.tracking import MlflowClient

    (run,) = MlflowClient(uri).search_runs(["1"])
    return cwd, uri, run.info.run_id


@pytest.fixture(scope="module")
def exported(trained: tuple[Path, str, str]) -> tuple[Path, str]:
    cwd, uri, run_id = trained
    out = cwd / "model.onnx"
    proc = run_cli(
        ["--run-id", run_id, "--tracking-uri", uri, "--out", str(out)],
        cwd=cwd,
        module="fer_sweep.export",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_export_is_one_file_with_a_free_batch_and_checked_parity(
    exported: tuple[Path, str], trained: tuple[Path, str, str]
) -> None:
    import onnxruntime as ort

    out, stdout = exported
    assert [p.name for p in out.parent.iterdir() if p.name.startswith("model.onnx")] == [
        "model.onnx"
    ]  # no external-data file beside it
    line = next(s for s in stdout.splitlines() if s.startswith("parity"))
    n = int(line.split("(")[1].split()[0])
    assert n == 7 * 20  # the run's whole test split (data.limit_per_class=20)
    same = float(line.split("):")[1].split("%")[0])
    assert same >= 99.9, line
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["fer_sweep"])
    assert meta["run_id"] == trained[2] and meta["classes"][3] == "happy"
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(uint8)" and not isinstance(inp.shape[0], int)
    for batch in (1, 300):  # any batch size
        x = np.random.default_rng(0).integers(0, 256, (batch, 48, 48), dtype=np.uint8)
        (probs,) = session.run(None, {"pixels": x})
        assert probs.shape == (batch, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_predict_from_the_onnx_file_equals_the_pytorch_model(
    exported: tuple[Path, str], trained: tuple[Path, str, str], tmp_path: Path
) -> None:
    cwd, uri, run_id = trained
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (60, 50, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    common = [str(tmp_path), "--format", "json", "--device", "cpu"]
    ours = run_cli(
        [*common, "--run-id", run_id, "--tracking-uri", uri], cwd=cwd, module="fer_sweep.predict"
    )
    theirs = run_cli([*common, "--onnx", str(exported[0])], cwd=cwd, module="fer_sweep.predict")
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    a, b = json.loads(ours.stdout), json.loads(theirs.stdout)
    assert b["run_id"] == run_id
    pa = {p["image"]: p for p in a["predictions"]}
    assert sorted(pa) == sorted(p["image"] for p in b["predictions"]) and len(pa) == 5
    for p in b["predictions"]:  # the run trained in bf16 here: PyTorch predicts in bf16 too
        onnx_p = np.array(list(p["probabilities"].values()))
        torch_p = np.array(list(pa[p["image"]]["probabilities"].values()))
        assert np.allclose(onnx_p, torch_p, atol=2e-2), (onnx_p, torch_p)
        top2 = np.sort(onnx_p)[-2:]
        if top2[1] - top2[0] > 0.05:
            assert p["emotion"] == pa[p["image"]]["emotion"]


def test_a_foreign_or_broken_onnx_file_is_one_line(tmp_path: Path) -> None:
    foreign = tmp_path / "other.onnx"
    torch.onnx.export(
        torch.nn.Linear(10, 2), (torch.zeros(1, 10),), str(foreign), dynamo=True, verbose=False
    )
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    Image.new("L", (48, 48), 100).save(tmp_path / "face.png")
    for path, needle in ((foreign, "is not a fer_sweep export"), (broken, "onnxruntime")):
        proc = run_cli(
            [str(tmp_path / "face.png"), "--onnx", str(path)],
            cwd=tmp_path,
            module="fer_sweep.predict",
        )
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    proc = run_cli(["--run-id", "nope", "--no-check"], cwd=tmp_path, module="fer_sweep.export")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_without_the_serving_extra_it_is_one_line_naming_the_install(tmp_path: Path) -> None:
    """A plain `pip install -e .` has no onnx/onnxruntime: stand-ins that fail to import as a
    missing package does, first on the path."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("onnx", "onnxruntime"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('No module named {name}')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])}
    Image.new("L", (48, 48), 100).save(tmp_path / "face.png")
    cases = [
        ("fer_sweep.predict", [str(tmp_path / "face.png"), "--onnx", "m.onnx"], "onnxruntime not"),
        ("fer_sweep.export", ["--run-id", "nope"], "onnx, onnxscript, onnxruntime not installed"),
        ("fer_sweep.serve", ["--run-id", "nope", "--name", "x"], "onnx, onnxscript, onnxruntime"),
    ]
    for module, args, needle in cases:
        proc = run_cli(args, cwd=tmp_path, module=module, env=env)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
        assert "pip install -e '.[serve]'" in proc.stderr and "Traceback" not in proc.stderr
