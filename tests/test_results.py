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
    models = {
        b.name.split("-")[1] for b in BUNDLES if b.name.startswith(("row5-", "row6-", "row7-"))
    }
    assert models, f"no Table 2 ResNet bundle under {RESULTS}"
    assert models <= set(TABLE2_ROWS.values()), models


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_committed_bundle_passes_every_check(bundle: Path) -> None:
    root = Path(os.environ["FER2013_ROOT"]) if real_data() else None
    v = verify.verify_bundle(bundle, root)
    assert not v.failed, v.line()
    # the study's recipe: 100 epochs, every test image of FER2013
    assert v.passed[0].startswith("epochs 1..100 once each"), v.line()
    assert "/7178 predictions" in v.line(), v.line()
