"""scripts/gpu_check.sh in smoke mode (every phase, on a tiny subset, on this machine's device)
and the hydra/launcher=submitit_gpu preset (one GPU per job for submitit's local executor)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import REPO, real_data

PHASES = [
    "env",
    "prepare",
    "bench",
    "table2",
    "compile",
    "fast",
    "report",
    "bench_channels_last_off",
]


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {
        **os.environ,
        "GPU_CHECK_SMOKE": "1",
        "OUT": str(out),
        # a loaded CI machine may be slower than the 8 minutes a GPU gets
        "GPU_CHECK_BUDGET_S": "900",
        "TMPDIR": str(tmp_path),
        "PY": sys.executable,  # this interpreter, not whichever `python` the PATH finds first
    }
    # A `python` first on the PATH that is not this one (a fresh venv, not activated): the
    # check must not start it.
    shim = tmp_path / "bin"
    shim.mkdir()
    for name in ("python", "python3"):
        (shim / name).write_text("#!/bin/sh\necho 'not the interpreter under test' >&2\nexit 3\n")
        (shim / name).chmod(0o755)
    env["PATH"] = f"{shim}:{env.get('PATH', '')}"
    if real_data():
        env.pop("GPU_CHECK_OVERRIDES", None)
    else:
        env.pop("FER2013_ROOT", None)
        env["GPU_CHECK_OVERRIDES"] = "data=synthetic"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["ok"] is True and summary["smoke"] is True and summary["exit_code"] == 0
    status = {p["name"]: p["status"] for p in summary["phases"]}
    assert status == {name: "ok" for name in PHASES}, status
    assert all(isinstance(p["seconds"], int) for p in summary["phases"])

    runs = summary["runs"]
    table2 = [r for r in runs if r["kind"] == "table2"]
    compiled = [r for r in runs if r["kind"] == "compile"]
    fast = [r for r in runs if r["kind"] == "fast"]
    assert len(table2) >= 7 and len(compiled) == 1, [r["name"] for r in runs]
    assert len(fast) == 1 and fast[0]["status"] == "FINISHED", fast  # experiment=fast, unchanged
    assert sorted(r["row"] for r in table2) == [f"row{i}" for i in range(1, 8)]
    for r in [*table2, *compiled]:
        assert r["status"] == "FINISHED", r
        assert r["device"] and r["device_name"] and r["precision"] in ("bf16", "fp32"), r
        assert r["epochs_run"] == 1 and r["epoch_seconds_mean"] is not None, r
        assert r["test_acc"] is not None and r["floor_pct"] == (
            None if r["kind"] == "compile" else round(r["study_pct"] - 5, 1)
        ), r
        assert r["pass_floor"] is None  # smoke mode: no accuracy floor
    assert compiled[0]["compile"] == "True"
    assert not summary["failed_checks"], summary["checks"]
    assert (out / "gpu_check.md").read_text().startswith("# GPU check: OK")
    assert (out / "report" / "table2.csv").is_file()
    assert json.loads((out / "bench.json").read_text())["records"]
    assert (out / "env.json").is_file() and (out / "mlflow.db").is_file()


def test_submitit_gpu_preset_gives_each_job_one_gpu() -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=submitit_gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher.gpus_per_node == 1
    assert launcher.tasks_per_node == 1 and launcher.nodes == 1
    assert launcher._target_.endswith("submitit_launcher.LocalLauncher")
