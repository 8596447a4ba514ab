"""`ahl ui` in a real browser: headless Chromium loads the store's sequence run and finds the
forgetting metrics. The screenshots are kept as test artifacts (test-artifacts/ by default)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from adapterhub_local import Hub
from adapterhub_local.sequence import sequence_run
from conftest import FAST
from services import chromium, chromium_page, free_port

ARTIFACTS = Path(os.environ.get("AHL_TEST_ARTIFACTS",
                                Path(__file__).resolve().parent.parent / "test-artifacts"))
METRICS = ["sequence", "How each earlier task held up", "oracle/bwt", "oracle/acc/colors",
           "routed/acc/animals", "routing/acc/colors"]  # on the sequence run's overview
CHARTS = ["composed/acc", "forgetting"]  # on its model-metrics tab


def test_the_sequence_run_shows_the_forgetting_metrics_in_chromium(store_dir, tiny_data, tiny_base):
    chromium()  # skips (or fails under .ci/run) before any work when there is no browser
    hub = Hub(store_dir)
    for task in ("colors", "animals"):
        hub.add_task(task, tiny_data[task]["train"], tiny_data[task]["test"], base=tiny_base, **FAST)
    experiment, run = hub.store.experiment_id(), sequence_run(hub.store)
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "adapterhub_local.cli", "ui", "--port", str(port),
                           "--store", str(store_dir)], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert url in ui.stdout.readline()  # printed once the server answers
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        # The link ahl ui prints opens model training (the runs table), not the GenAI view
        # (traces, judges, evaluation runs) that MLflow 3 opens by default.
        runs = page_showing(f"{url}/#/experiments/{experiment}?workflowType=machine_learning",
                            ARTIFACTS / "ui_experiment.png", ["matching runs"])
        page = f"{url}/#/experiments/{experiment}/runs/{run}"
        # In the model-training view, as the link ahl ui prints (a fresh browser's default is
        # the GenAI view, whose run pages load more and came back unfinished on a busy machine).
        view = "?workflowType=machine_learning"
        overview = page_showing(page + view, ARTIFACTS / "ui_sequence_run.png", METRICS)
        charts = page_showing(f"{page}/model-metrics{view}", ARTIFACTS / "ui_model_metrics.png",
                              CHARTS)
    finally:
        ui.send_signal(signal.SIGINT)
        ui.wait(timeout=30)
    assert "matching runs" in runs and "Evaluation runs" not in runs and "Judges" not in runs
    for metric in METRICS:
        assert metric in overview, metric
    for chart in CHARTS:  # the charts, sectioned by prefix
        assert chart in charts, chart
    for shot in ("ui_experiment.png", "ui_sequence_run.png", "ui_model_metrics.png"):
        assert (ARTIFACTS / shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def page_showing(url: str, screenshot, texts: list[str], attempts: int = 4) -> str:
    """The page's DOM once it shows every one of `texts` (a page renders its parts one by one:
    a chart section's title can come before its charts): on a busy machine the UI's requests
    can outlast the browser's virtual time budget, so a page that came back unfinished is
    loaded again with twice the budget (20 s, 40 s, 80 s, 160 s of virtual time)."""
    wait_ms = 20000
    for _ in range(attempts):
        dom = chromium_page(url, screenshot, wait_ms)
        if all(text in dom for text in texts):
            break
        wait_ms *= 2
    return dom
