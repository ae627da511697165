"""MLflow tracking that never stalls training and never loses a metric.

`RunLogger` hands every call to a background thread that delivers it in order through MLflow's
client. While the tracking server is down the thread keeps the items and retries; what is still
undelivered when the run closes is written to a spool file under the local state directory, and
`replay_spool` delivers it on a later command (every `sweeper` command that tracks calls it first).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# MLflow's REST client retries a dead server for minutes inside one call; we retry ourselves, in the
# background, so each attempt should fail fast. Set before mlflow reads them.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

STATE_DIR = Path(os.environ.get("SWEEPER_STATE_DIR", "mlruns"))
DEFAULT_TRACKING_URI = f"sqlite:///{STATE_DIR}/mlflow.db"
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000

log = logging.getLogger("sweeper.tracking")


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or refused a request; the message names the URI."""


def tracking_uri(uri: str | None = None) -> str:
    """The URI to use: the argument, else $MLFLOW_TRACKING_URI, else SQLite under mlruns/."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local SQLite store live beside it (mlruns/artifacts); a server picks its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()
    return None


def connect(uri: str | None = None):
    """An MlflowClient for `uri`, checked to answer, or a TrackingError that says what to do."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means the store is unusable
        hint = ""
        if urlparse(uri).scheme in ("http", "https"):
            hint = (" Is the server running? Start one with `sweeper server`, or use the local store with "
                    f"--tracking-uri {DEFAULT_TRACKING_URI}.")
        raise TrackingError(f"MLflow tracking store {uri} is unreachable: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}.{hint}") from None
    return client


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))


def start_run(client, experiment: str, run_name: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=all_tags)
    return run.info.run_id


def param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)
    return text[:MAX_PARAM_LENGTH]


class RunLogger:
    """Asynchronous, ordered, outage-proof logging into one MLflow run."""

    def __init__(self, client, run_id: str, spool_dir: Path | None = None, retry_max: float = 10.0):
        self.client, self.run_id = client, run_id
        self.spool_dir = Path(spool_dir) if spool_dir is not None else STATE_DIR / "spool"
        self.retry_max = retry_max
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[tuple] = []  # taken from the queue, not yet delivered (in order)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failures = 0  # delivery attempts that failed (the server was down)
        self._thread = threading.Thread(target=self._run, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()

    # -- the calls training makes: they only enqueue ------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        stamp = int(time.time() * 1000)
        items = [(k, float(v), stamp, int(step or 0)) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._queue.put(("metrics", items[i:i + MAX_METRICS_PER_BATCH]))

    def log_params(self, params: dict[str, Any]) -> None:
        items = [(k, param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._queue.put(("params", items[i:i + MAX_PARAMS_PER_BATCH]))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._queue.put(("tags", [(k, str(v)) for k, v in tags.items()]))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._queue.put(("artifact", str(local_path), artifact_path))

    def terminate(self, status: str = "FINISHED") -> None:
        self._queue.put(("terminate", status))

    def close(self, status: str | None = "FINISHED", timeout: float = 30.0) -> bool:
        """Deliver everything (waiting up to `timeout` s while the server is down); spool the rest.
        Returns True when all was delivered."""
        if status is not None:
            self.terminate(status)
        self._queue.put(("close",))
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(15)  # a delivery in flight may take up to the HTTP timeout
        with self._lock:
            rest = self._pending + self._drain()
            self._pending = []
        rest = [op for op in rest if op[0] != "close"]
        if rest:
            self._spool(rest)
            return False
        return True

    # -- the background thread --------------------------------------------------------------------

    def _drain(self) -> list[tuple]:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def _run(self) -> None:
        delay = 0.25
        while True:
            with self._lock:
                if not self._pending:
                    try:
                        self._pending.append(self._queue.get(timeout=0.1))
                    except queue.Empty:
                        if self._stop.is_set():
                            return
                        continue
                op = self._pending[0]
            if op[0] == "close":
                with self._lock:
                    self._pending.pop(0)
                return
            try:
                deliver(self.client, self.run_id, op)
            except Exception as err:  # noqa: BLE001 - the server is down or refused: keep and retry
                self.failures += 1
                log.warning("MLflow delivery to run %s failed (%s); will retry", self.run_id[:8], err)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self.retry_max)
                continue
            delay = 0.25
            with self._lock:
                self._pending.pop(0)

    def _spool(self, ops: list[tuple]) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        path = self.spool_dir / f"{self.run_id}-{uuid.uuid4().hex[:8]}.jsonl"
        with open(path, "w") as fh:
            fh.write(json.dumps({"tracking_uri": self.client.tracking_uri, "run_id": self.run_id}) + "\n")
            for op in ops:
                fh.write(json.dumps(op) + "\n")
        log.warning("MLflow store unreachable: %d pending items of run %s kept in %s; they are delivered "
                    "by the next sweeper command that reaches it", len(ops), self.run_id[:8], path)


def deliver(client, run_id: str, op: tuple) -> None:
    from mlflow.entities import Metric, Param, RunTag

    kind = op[0]
    if kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in op[1]], synchronous=True)
    elif kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in op[1]], synchronous=True)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op[1]], synchronous=True)
    elif kind == "artifact":
        client.log_artifact(run_id, op[1], op[2])
    elif kind == "terminate":
        client.set_terminated(run_id, status=op[1])
    else:  # pragma: no cover
        raise ValueError(f"unknown tracking op {kind}")


def replay_spool(client, spool_dir: Path | None = None) -> int:
    """Deliver spooled items for this tracking URI; returns how many files were delivered."""
    spool_dir = Path(spool_dir) if spool_dir is not None else STATE_DIR / "spool"
    done = 0
    for path in sorted(spool_dir.glob("*.jsonl")) if spool_dir.exists() else []:
        lines = path.read_text().splitlines()
        head = json.loads(lines[0])
        if head["tracking_uri"] != client.tracking_uri:
            continue
        try:
            for line in lines[1:]:
                deliver(client, head["run_id"], tuple(json.loads(line)))
        except Exception as err:  # noqa: BLE001 - still down: keep the file for next time
            log.warning("spooled items in %s not delivered yet: %s", path, err)
            continue
        path.unlink()
        done += 1
    return done
