"""The MLflow UI, as a person sees it: headless Chromium opens the sweep's experiment page.

Served by the same real server as test_server.py (``python -m fer_sweep.ui``), driven by
Playwright over Debian's /usr/bin/chromium (.ci/run installs it); skipped where it is absent.
A screenshot is kept in the test's tmp folder and copied to /tmp/ui_screenshot.png.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mlflow_server import EXPERIMENT, SWEEP_MODELS, Server, shared_server, sweep_on

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.xdist_group("mlflow_server"),  # one shared server
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
    ),
]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with shared_server(tmp_path_factory) as srv:
        yield srv


@pytest.fixture
def page() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 900})
        finally:
            browser.close()


def test_experiment_page_lists_the_sweeps_runs(
    server: Server, page: Any, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sweep = sweep_on(server, tmp_path_factory)
    assert sweep.proc.returncode == 0, sweep.proc.stderr[-4000:]
    exp = server.get_json("/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT)
    exp_id = exp["experiment"]["experiment_id"]
    found = server.post_json("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})
    names = {r["info"]["run_name"]: r for r in found["runs"]}
    parent = next(n for n, r in names.items() if n.startswith("sweep-"))
    children = sorted(n for n in names if n != parent)
    assert [c.removeprefix("SYNTHETIC-").split("-")[0] for c in children] == sorted(SWEEP_MODELS)

    # workflowType=machine_learning: MLflow 3 otherwise opens its GenAI (traces) view.
    page.goto(f"{server.url}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
    shot = tmp_path / "ui.png"
    try:
        page.get_by_text(parent, exact=True).wait_for(timeout=90_000)
        # Child runs are folded under their parent: unfold them with the row's +/- button.
        parent_cell = page.locator("[role=gridcell]", has_text=parent)
        parent_cell.locator("button").first.click()
        for child in children:
            page.get_by_text(child, exact=True).first.wait_for(timeout=30_000)
            assert page.get_by_text(child, exact=True).first.is_visible()
        assert page.get_by_text(f"{len(names)} matching runs").is_visible()
    finally:
        page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
