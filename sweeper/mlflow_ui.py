"""What MLflow 3's UI shows first for a study, and the link that opens it.

MLflow's experiment page takes its state from two places a client can write (read from MLflow 3.17's
UI bundle, `mlflow/server/js/build`):

- the experiment tag `mlflow.experimentKind` (`custom_model_development`) and the URL parameter
  `workflowType=machine_learning` on the `/runs` route: the "Model training" view (runs, charts)
  instead of the GenAI overview (traces), which MLflow 3.17 opens by default;
- a *shared view state*: the experiment tag `mlflow.sharedViewState.KEY`, a JSON object, which the page
  loads when its URL carries `?viewStateShareKey=KEY` (what the UI's own "Share" button writes). It holds
  the search facets (`searchFilter`, `orderByKey`, `orderByAsc`, ...) and the table and chart state
  (`selectedColumns`, `compareRunCharts`, `compareRunSections`, ...).

A search filter or an order key other than the creation time makes the runs table flat (MLflow nests
child runs under their parent only when neither is set), so the study's view filters on the trials'
`sweeper.kind` tag and orders by the objective: one row per trial, the best first, the objective and
each varied parameter as columns. Its charts begin with the per-epoch curves of the objective and of
the losses (a section marked reordered keeps that order; MLflow appends the other metrics after them).

This module imports nothing heavy: the study builds the tags, the courier delivers them, `sweeper
server` prints the links.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

VIEW_KEY = "sweeper"  # ?viewStateShareKey=sweeper
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
STUDY_TAG = "sweeper.study"  # experiment tag: the study this experiment records
TRIAL_FILTER = "tags.`sweeper.kind` = 'trial'"
MAX_TAG_VALUE = 5000  # MLflow's limit on an experiment tag's value
MODEL_SECTION = "Model metrics"  # MLflow's section of metrics without a "/" prefix
SYSTEM_SECTION = "System metrics"  # ... and of "system/*"


def column(kind: str, key: str) -> str:
    """A runs-table column id: kind is attributes, params, metrics or tags."""
    return f"{kind}.`{key}`"


def _line_chart(metric: str, section: str) -> dict[str, Any]:
    return {"uuid": f"sweeper-{metric}", "type": "LINE", "isGenerated": True, "deleted": False,
            "metricSectionId": section, "metricKey": metric, "displayName": metric, "runsCountToCompare": 10,
            "selectedMetricKeys": [metric], "lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear",
            "range": {}, "xAxisKey": "step", "selectedXAxisMetricKey": "", "yAxisKey": "metric",
            "yAxisExpressions": [], "ignoreOutliers": False, "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True}


def view_state(objective: str, ascending: bool, params: Iterable[str],
               leading_metrics: Iterable[str] = ("train_loss", "eval_loss")) -> dict[str, Any]:
    """The shared view of a study's experiment: its trials flat, ordered by the `objective` metric, with
    the objective and `params` as columns; the charts led by the objective and `leading_metrics`."""
    charts = []
    for metric in dict.fromkeys([objective, *leading_metrics]):
        charts.append(_line_chart(metric, "sweeper-model"))
    sections = [{"uuid": "sweeper-model", "name": MODEL_SECTION, "display": True, "isReordered": True, "deleted": False},
                {"uuid": "sweeper-system", "name": SYSTEM_SECTION, "display": True, "isReordered": False,
                 "deleted": False}]
    return {
        "searchFilter": TRIAL_FILTER,
        "orderByKey": column("metrics", objective),
        "orderByAsc": bool(ascending),
        "selectedColumns": [column("metrics", objective), *(column("params", p) for p in params),
                            column("attributes", "Duration"), column("attributes", "Dataset"),
                            column("attributes", "Models")],
        "columnOrder": [column("metrics", objective), *(column("params", p) for p in params), "duration",
                        column("attributes", "Dataset"), column("attributes", "Models")],
        "runsHiddenMode": "FIRST_10_RUNS",
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "isAccordionReordered": True,
        "hideEmptyCharts": True,
    }


def experiment_tags(study: str, objective: str, ascending: bool, params: Iterable[str],
                    description: str = "") -> dict[str, str]:
    """The experiment tags that make MLflow open the study as `view_state` describes."""
    params = list(params)
    state = view_state(objective, ascending, params)
    text = json.dumps(state, separators=(",", ":"))
    while len(text) > MAX_TAG_VALUE and params:  # (a study varying very many keys: the first ones)
        params.pop()
        state = view_state(objective, ascending, params)
        text = json.dumps(state, separators=(",", ":"))
    tags = {KIND_TAG: MODEL_TRAINING, STUDY_TAG: study, SHARED_VIEW_PREFIX + VIEW_KEY: text,
            "mlflow.experiment.primaryMetric.name": objective}
    if description:
        tags["mlflow.note.content"] = description
    return tags


def experiment_url(base: str, experiment_id: str, key: str | None = VIEW_KEY) -> str:
    """The link to an experiment's page, opening on the shared view `key`."""
    url = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return f"{url}&viewStateShareKey={key}" if key else url


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def browse_host(host: str) -> str:
    """The host a browser on this machine reaches a server bound to `host` at."""
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def study_links(client, base: str, study: str | None = None) -> list[tuple[str, str]]:
    """(study name, link) of every experiment a study recorded (tagged `sweeper.study`), or of `study`."""
    from mlflow.entities import ViewType

    out = []
    for exp in client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000):
        name = exp.tags.get(STUDY_TAG)
        if name is None or (study is not None and name != study and exp.name != study):
            continue
        key = VIEW_KEY if SHARED_VIEW_PREFIX + VIEW_KEY in exp.tags else None
        out.append((name, experiment_url(base, exp.experiment_id, key)))
    return sorted(out)
