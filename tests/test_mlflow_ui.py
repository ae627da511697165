"""The link `sweeper server` prints opens the study's trials compared, in a real browser (Debian's
chromium driven by Playwright): one row per trial, the objective's and each varied parameter's values,
no click; a trial's page shows its logged model and dataset."""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import free_port, subprocess_env, sweeper_cmd, write_spec

from sweeper import study as st
from sweeper.spec import load_spec

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])


def _cells(page, col: str) -> list[str]:
    return [t.strip() for t in page.locator(f'[role=gridcell][col-id="{col}"]').all_inner_texts()]


def test_server_link_shows_the_trials_compared(workdir):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extras)")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    spec = write_spec(workdir / "ui.yaml", "ui", description="UI test grid.",
                      grid={"optim": [{"name": "sgdm", "lr": 0.05}, {"name": "adamw", "lr": 0.003}],
                            "batch_size": [16, 32]})
    out = st.run(load_spec(str(spec)), tracking_uri="sqlite:///mlruns/mlflow.db", quiet=True, echo=lambda line: None)
    values = {t.number: t.value for t in out.study.trials}
    port = free_port()
    proc = subprocess.Popen(sweeper_cmd("server", "--port", str(port), "--workers", "1", "--study", "ui"),
                            cwd=workdir, env=subprocess_env(workdir, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        link = re.search(r"study ui: (\S+)", line)
        assert link, f"no link printed: {line!r}"
        url = link.group(1)
        with playwright.sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page(viewport={"width": 2000, "height": 1000})
            deadline = time.monotonic() + 90
            while True:  # the server takes a few seconds to answer
                try:
                    page.goto(url)
                    break
                except Exception:  # noqa: BLE001
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            objective = "metrics.`eval_acc`"
            try:
                page.wait_for_function(
                    f"document.querySelectorAll('[role=gridcell][col-id=\"{objective}\"]').length >= {len(values)}",
                    timeout=60000)
            except Exception:  # noqa: BLE001 - say what was there instead
                page.screenshot(path=str(workdir / "ui.png"))
                headers = page.evaluate("Array.from(document.querySelectorAll('[role=columnheader]'))"
                                        ".map(e => e.getAttribute('col-id') + ':' + e.innerText)")
                pytest.fail(f"no {objective} column with {len(values)} rows at {page.url}; columns: {headers}; "
                            f"page text: {page.inner_text('body')[:1500]!r}; screenshot {workdir / 'ui.png'}")
            shown = [float(v) for v in _cells(page, objective)]
            assert len(shown) == len(values), f"expected one row per trial, saw {shown}"  # flat: no parent row
            assert shown == pytest.approx(sorted(values.values(), reverse=True), abs=1e-3), shown
            names = _cells(page, "params.`optim.name`")
            sizes = _cells(page, "params.`batch_size`")
            assert sorted(names) == ["adamw", "adamw", "sgdm", "sgdm"], names
            assert sorted(sizes) == ["16", "16", "32", "32"], sizes
            assert "workflowType=machine_learning" in page.url

            # A trial's page: its logged model and its dataset.
            from mlflow.tracking import MlflowClient

            client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")  # (MLflow caches stores by URI)
            exp = client.get_experiment_by_name("ui")
            run = client.search_runs([exp.experiment_id], "tags.`sweeper.kind` = 'trial'", max_results=1)[0]
            page.goto(url.split("#")[0] + f"#/experiments/{exp.experiment_id}/runs/{run.info.run_id}")
            page.wait_for_selector("text=synthetic-train", timeout=60000)
            model_id = run.outputs.model_outputs[0].model_id
            text = page.inner_text("body")
            assert "synthetic-train" in text and ("model" in text.lower()), text[:2000]
            assert page.locator(f'a[href*="{model_id}"]').count() > 0 or "Logged models" in text, text[:3000]
            browser.close()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
