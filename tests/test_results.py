"""The bundles committed under results/ pass report --verify's checks: the accuracy recomputed
from their predictions is the logged one, every epoch once, the learning rates replayed."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fer_sweep.tools.report import verify
from tests.conftest import real_data, run_cli

RESULTS = Path(__file__).resolve().parents[1] / "results"
BUNDLES = sorted(p.parent for p in RESULTS.glob("*/metrics.json"))
MODULE = "fer_sweep.report"
TABLE2_ROWS = {5: "resnet_small", 6: "resnet", 7: "resnet_dropout"}


def test_results_hold_table2_resnet_bundles() -> None:
    """Each bundle named for a Table 2 row holds that row's model."""
    rows = [b for b in BUNDLES if b.name.startswith(("row5-", "row6-", "row7-"))]
    assert rows, f"no Table 2 ResNet bundle under {RESULTS}"
    for b in rows:
        model = (b / "config.yaml").read_text().split("model:\n  name: ")[1].split()[0]
        assert model == TABLE2_ROWS[int(b.name[3])] == b.name.split("-")[1], b.name


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_committed_bundle_passes_every_check(bundle: Path) -> None:
    """With FER2013_ROOT (the real data) also every prediction's image and every test image of
    that copy; without it (CI) the bundle's own files only."""
    root = Path(os.environ["FER2013_ROOT"]) if real_data() else None
    v = verify.verify_bundle(bundle, root)
    assert not v.failed, v.line()
    # the study's recipe: 100 epochs, every test image of FER2013
    assert any(p.startswith("epochs 1..100 once each") for p in v.passed), v.line()
    assert "/7178 predictions" in v.line(), v.line()
    if root is not None:
        assert "all 7178 test images of the data root" in v.passed, v.line()


def test_table2_from_the_committed_bundles_alone(tmp_path: Path) -> None:
    """The report rebuilds Table 2's measured ResNet rows from results/ with no store: each
    bundle a row with its logged accuracy, wall time and resumes."""
    out = tmp_path / "report"
    proc = run_cli(
        ["--bundles", str(RESULTS), "--prior-runs", str(RESULTS / "rows1-4-seeds.csv")]
        + ["--out", str(out)],
        cwd=tmp_path,
        module="fer_sweep.report",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with (out / "runs.csv").open() as f:
        runs = {r["run_id"]: r for r in csv.DictReader(f)}
    assert len(runs) == len(BUNDLES)
    for b in BUNDLES:
        info = json.loads((b / "metrics.json").read_text())
        run = runs[info["run_id"]]
        assert float(run["test_acc_pct"]) == pytest.approx(100 * info["test_acc"])
        assert int(run["resumes"]) == info["resumes"]
        assert float(run["wall_seconds"]) == pytest.approx(info["metrics"]["train_seconds"])
    with (out / "table2.csv").open() as f:
        rows = list(csv.DictReader(f))
    launched = {_row(json.loads((b / "metrics.json").read_text())) for b in BUNDLES}
    assert [int(r["study_row"]) for r in rows] == sorted(launched)  # seeds of a row: one group


def _row(info: dict) -> int:
    """The Table 2 row a bundle's run was launched as (its table2=row<N> override)."""
    (row,) = [o.split("=row")[1] for o in info["tags"]["overrides"].split() if "table2=row" in o]
    return int(row)


def test_bundles_a_report_cannot_trust_are_refused(tmp_path: Path) -> None:
    """Two different exports of one run, or a bundle without its config: one line, exit 2,
    before any file. Copies of one export count once."""
    bundle = BUNDLES[0]
    for name in ("a", "b"):
        shutil.copytree(bundle, tmp_path / name / bundle.name)

    def report(*dirs: str, out: str = "no") -> subprocess.CompletedProcess:
        args = [a for d in dirs for a in ("--bundles", str(tmp_path / d))]
        return run_cli([*args, "--out", str(tmp_path / out)], cwd=tmp_path, module=MODULE)

    proc = report("a", "b", out="ok")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "ok" / "runs.csv").read_text().splitlines()) == 2  # header, one run
    info = tmp_path / "b" / bundle.name / "metrics.json"
    info.write_text(info.read_text().replace('"resumes": ', '"resumes": 1', 1))
    proc = report("a", "b")
    assert proc.returncode == 2 and "two different exports of run" in proc.stderr, proc.stderr
    (tmp_path / "a" / bundle.name / "config.yaml").write_text("")
    proc = report("a")
    assert proc.returncode == 2 and "config.yaml holds no model section" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "no").exists()
