"""The bundles committed under results/ pass report --verify's checks: the accuracy recomputed
from their predictions is the logged one, every epoch once, the learning rates replayed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fer_sweep.tools.report import verify
from tests.conftest import real_data

RESULTS = Path(__file__).resolve().parents[1] / "results"
BUNDLES = sorted(p.parent for p in RESULTS.glob("*/metrics.json"))
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
