"""The Prefect UI in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

A dedicated Prefect server with its UI (the session server runs without one) runs a real
pipeline through ``dpipeline run``; the browser then opens the finished flow run's page (name,
pipeline tag, Completed state, the run's own log line, the shard task runs, the Artifacts
tab) and the event feed (the run's ``dpipeline.*`` events on the pipeline resource, related to
this flow run). Screenshots go to ``build/ui-screenshots/`` (and the test's tmp_path).

.ci/run installs chromium when it is missing; this test needs it and fails without it.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from dpipeline_prefect.devservices import PrefectServer

from .pipeline_helpers import flights, run_cli, write_parquet_files, write_yaml

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "build" / "ui-screenshots"
TIMEOUT_MS = 90_000  # generous: two cores shared with the rest of the suite


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    srv = PrefectServer(tmp_path_factory.mktemp("prefect-ui"), ui=True, startup_timeout=180)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def browser():
    import playwright.sync_api as playwright  # a test dependency: missing is a failure, not a skip

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: .ci/run installs Debian's chromium"
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        yield b
        b.close()


def _shot(page, tmp_path: Path, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    shutil.copy(path, SHOTS / path.name)
    return SHOTS / path.name


@pytest.mark.slow
def test_finished_run_page_and_dpipeline_events_in_chromium(tmp_path, ui_server, browser):
    name = "ui-" + uuid.uuid4().hex[:8]
    write_parquet_files(flights(6000), tmp_path / "in", files=3, row_group_size=1000)
    y = write_yaml(tmp_path / "p.yaml", {
        "name": name,
        "source": {"format": "parquet", "path": str(tmp_path / "in")},
        "batching": {"rows": 1000},
        "transforms": ["dpipeline_prefect.examples.flights:clean"],
        "sink": {"format": "parquet", "path": str(tmp_path / "out")},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": {"kind": "threads", "workers": 2},
    })
    r = run_cli("run", str(y), "--run-key", "ui", "--summary-json", str(tmp_path / "s.json"),
                # INFO: the run's own log lines reach the server (conftest sets WARNING)
                env={"PREFECT_API_URL": ui_server.api_url, "PREFECT_LOGGING_LEVEL": "INFO"},
                timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    flow_run_id = summary["flow_run_id"]

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)

    # the flow run's page: its name, the pipeline tag, Completed, a log line of ours
    page.goto(f"{ui_server.ui_url}/runs/flow-run/{flow_run_id}", wait_until="networkidle")
    page.get_by_text(f"{name}-ui", exact=True).first.wait_for()
    page.get_by_text(f"dpipeline:{name}", exact=True).first.wait_for()
    page.get_by_text("Completed", exact=True).first.wait_for()
    try:  # (the log list renders lazily: this line of ours comes early)
        page.get_by_text("planned 3 input file(s)").first.wait_for()
    finally:
        run_shot = _shot(page, tmp_path, f"{name}-flow-run")

    # its task runs: one per shard
    page.get_by_text("Task Runs", exact=True).first.click()
    try:
        for i in range(3):
            page.get_by_text(f"shard-part-{i:03d}.parquet").first.wait_for()
    finally:
        _shot(page, tmp_path, f"{name}-task-runs")

    # the Artifacts tab: the per-shard table and the markdown summary (artifacts.py)
    page.get_by_text("Artifacts", exact=True).first.click()
    try:
        page.get_by_text(f"dpipeline-{name}-shards").first.wait_for()
        page.get_by_text(f"dpipeline-{name}-summary").first.wait_for()
    finally:
        _shot(page, tmp_path, f"{name}-artifacts")
    # the table artifact opened: one row per shard
    page.get_by_text(f"dpipeline-{name}-shards").first.click()
    try:
        page.wait_for_url("**/artifacts/**")
        for i in range(3):
            page.get_by_text(f"part-{i:03d}.parquet").first.wait_for()
    finally:
        _shot(page, tmp_path, f"{name}-shards-table")

    # the event feed: the run's dpipeline events, on the pipeline resource, with this flow run
    page.goto(f"{ui_server.ui_url}/events", wait_until="networkidle")
    try:
        for event in ("dpipeline.run.started", "dpipeline.run.completed", "dpipeline.shard.completed"):
            page.get_by_text(event, exact=True).first.wait_for()
        page.get_by_text(f"dpipeline.pipeline.{name}", exact=True).first.wait_for()
        completed = page.locator("div, li, article").filter(
            has_text="dpipeline.run.completed").filter(has_text=f"{name}-ui").last
        completed.wait_for()
    finally:
        events_shot = _shot(page, tmp_path, f"{name}-events")

    # the run-completed event on its own page: Raw shows the figures and the flow run
    page.get_by_text("Dpipeline run completed", exact=True).first.click()
    page.wait_for_url("**/events/event/**")
    page.get_by_text("Raw", exact=True).first.click()
    try:
        page.get_by_text(f'"rows_out": {summary["rows_out"]}').first.wait_for()
        page.get_by_text(f"prefect.flow-run.{flow_run_id}").first.wait_for()
        page.get_by_text(f'"prefect.resource.id": "dpipeline.pipeline.{name}"').first.wait_for()
    finally:
        _shot(page, tmp_path, f"{name}-event")
    assert run_shot.stat().st_size > 10_000 and events_shot.stat().st_size > 10_000
    print(f"screenshots: {SHOTS}")
