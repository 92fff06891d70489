"""sweep.resume: an interrupted sweep is finished under the same parent run, skipping what is
done and continuing what was cut off, without re-running the grid."""

from __future__ import annotations

import csv
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import migrated_store, run_cli, start_cli

pytestmark = pytest.mark.slow  # every test here starts the CLI

GRID = [
    "-m",
    "trainer.seed=0,1,2,3,4,5",
    "trainer.epochs=6",
    "data=synthetic",
    "data.limit_per_class=40",
    "trainer.progress=false",
    "mlflow.log_model=false",
    "mlflow.figures=false",
    "trainer.checkpoint_every_s=0",
]


def _runs(uri: str, role: str = "job") -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fer_sweep")
    return [
        r
        for r in client.search_runs([exp.experiment_id], max_results=1000)
        if r.data.tags.get("fer_sweep.role") == role
    ]


def test_interrupted_sweep_is_finished_under_the_same_parent(tmp_path: Path) -> None:
    uri = migrated_store(tmp_path / "m.db")
    MlflowClient(uri).search_experiments()  # the store exists before we poll it
    proc = start_cli([*GRID, f"mlflow.tracking_uri={uri}"], tmp_path)
    client = MlflowClient(uri)

    def cut_off() -> bool:  # two jobs done, the third one has a checkpoint
        runs = _runs(uri) if client.get_experiment_by_name("fer_sweep") else []
        done = [r for r in runs if r.info.status == "FINISHED"]
        running = [r for r in runs if r.info.status == "RUNNING"]
        return len(done) >= 2 and any(
            len(client.get_metric_history(r.info.run_id, "val_acc")) >= 2 for r in running
        )

    deadline = time.time() + 600
    while not cut_off():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "sweep.resume=latest" in out
    assert "trainer.resume=" not in out  # the sweep says how to continue, not each job
    before = {r.info.run_id: r for r in _runs(uri)}
    (parent,) = _runs(uri, "parent")
    assert parent.info.status == "KILLED"
    finished = {k for k, r in before.items() if r.info.status == "FINISHED"}
    killed = {k for k, r in before.items() if r.info.status == "KILLED"}
    assert len(finished) >= 2 and len(killed) == 1

    # A different grid is refused, before anything runs.
    other = run_cli(
        [
            *GRID[:1],
            "trainer.seed=0,1",
            *GRID[2:],
            f"mlflow.tracking_uri={uri}",
            "sweep.resume=latest",
        ],
        cwd=tmp_path,
    )
    assert other.returncode == 2 and "swept another grid" in other.stderr

    # As if fer_sweep had gained a setting since these runs started: their settings' hash is
    # older code's. Each is still found by the settings it logged (identity.same_run).
    (cut_id,) = killed
    for run_id in (cut_id, sorted(finished)[0]):
        client.set_tag(run_id, "fer_sweep.config_hash", "0ld0c0de0ld0c0de")
    resumed = run_cli([*GRID, f"mlflow.tracking_uri={uri}", "sweep.resume=latest"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (resumed.stdout + resumed.stderr).count("already FINISHED") == len(finished)
    # progress counts the skipped jobs as done, but takes its pace only from jobs trained here
    progress = [ln for ln in resumed.stderr.splitlines() if ln.startswith("fer_sweep: job ")]
    assert [ln.split(" · ")[0] for ln in progress] == [f"fer_sweep: job {i}/6" for i in range(1, 7)]
    assert not any("ETA" in ln for ln in progress[: len(finished)]), progress
    assert all("ETA" in ln for ln in progress[len(finished) : -1]), progress
    after = _runs(uri)
    (parent_after,) = _runs(uri, "parent")
    assert parent_after.info.run_id == parent.info.run_id  # the SAME parent ...
    assert parent_after.info.status == "FINISHED"  # ... finished now
    assert parent_after.data.metrics["jobs"] == 6 and parent_after.data.metrics["jobs_failed"] == 0
    by_seed: dict[str, list] = {}
    for r in after:
        if r.info.status == "FINISHED":
            by_seed.setdefault(r.data.params["trainer.seed"], []).append(r)
    assert sorted(by_seed) == [str(s) for s in range(6)]
    assert all(len(v) == 1 for v in by_seed.values())  # exactly one FINISHED run per job
    now = {r.info.run_id: r for r in after}
    for run_id in finished:  # not re-run
        assert now[run_id].info.end_time == before[run_id].info.end_time
    (cut,) = killed  # continued in its own run, from its checkpoint
    assert now[cut].info.status == "FINISHED"
    history = client.get_metric_history(cut, "val_acc")
    assert sorted(m.step for m in history) == list(range(6))
    # the run says it was resumed once, and from which epoch (the first one it trained again)
    assert now[cut].data.tags["fer_sweep.resumes"] == "1"
    (mark,) = client.get_metric_history(cut, "resumes")
    assert mark.value == 1 and 1 <= mark.step < 6
    assert all("fer_sweep.resumes" not in now[k].data.tags for k in finished)
    # ... and its exported bundle shows it: epochs 1..6 once each, the resume marked
    from fer_sweep.tools.report.export import bundle_name, write_bundle

    info = write_bundle(client, now[cut], tmp_path / "bundle" / bundle_name(now[cut]))
    assert info["epochs_logged"]["exactly_once"] and info["epochs_logged"]["epochs"] == 6
    assert info["resumes"] == 1
    assert info["test_acc_recomputed"] == pytest.approx(
        now[cut].data.metrics["test_acc"], abs=1e-12
    )
    # ... and --verify finds it whole, the plateau schedule replayed across the resume
    from fer_sweep.tools.report.verify import verify_bundle

    verdict = verify_bundle(tmp_path / "bundle" / bundle_name(now[cut]))
    assert not verdict.failed and "ReduceLROnPlateau replayed" in verdict.line(), verdict.line()
    lines = (tmp_path / "bundle" / bundle_name(now[cut]) / "history.csv").read_text().splitlines()
    resumes = [int(line.rsplit(",", 1)[1]) for line in lines[1:]]
    assert resumes == [0] * mark.step + [1] * (6 - mark.step)
    # ... and the report lists every run with its resumes (the cut one: 1) and training speed
    out = tmp_path / "report"
    proc = run_cli(
        ["--tracking-uri", uri, "--no-log", "--out", str(out)],
        cwd=tmp_path,
        module="fer_sweep.report",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "runs.csv").open() as f:
        listed = {r["run_id"]: r for r in csv.DictReader(f)}
    assert {k: r["resumes"] for k, r in listed.items()} == {k: str(int(k == cut)) for k in now}
    assert all(float(r["images_per_s"]) > 0 for r in listed.values())
    assert "## Runs" in (out / "table2.md").read_text()
