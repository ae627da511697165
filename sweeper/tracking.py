"""MLflow tracking that never stalls training and never loses a metric.

`RunLogger` hands every call to a background thread that delivers it in order through MLflow's
client. While the tracking server is down the thread keeps the items and retries; what is still
undelivered when the run closes is written to a spool file under the local state directory, and
`replay_spool` delivers it on a later command (every `sweeper` command that tracks calls it first).

A study goes one step further: a `Courier` child process owns the MLflow client and every RunLogger,
and the training process only sends it small messages (`RemoteLogger`). MLflow's imports, its SQLite
ORM and matplotlib then never compete with training for the GIL (a thread would: measured ~10% of a
study's wall time on 2 cores).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlsplit, urlunsplit

from . import uris
from .uris import DEFAULT_TRACKING_URI, STATE_DIR, TrackingError  # noqa: F401 - this module's names too

# MLflow's REST client retries a dead server for minutes inside one call; we retry ourselves, in the
# background, so each attempt should fail fast. Set before mlflow reads them.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# MLflow prints "View run ... at URL" from whichever thread ends a run, into our progress display.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000

log = logging.getLogger("sweeper.tracking")


def tracking_uri(uri: str | None = None) -> str:
    """The URI to use: the argument, else $MLFLOW_TRACKING_URI, else SQLite under mlruns/; checked, and a
    SQLite file's directory created (a TrackingError says why not). See `uris.tracking_uri`."""
    return uris.tracking_uri(uri)


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local SQLite store live beside it (mlruns/artifacts); a server picks its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()
    return None


def connect(uri: str | None = None):
    """An MlflowClient for `uri`, checked to answer, or a TrackingError that says what to do."""
    from mlflow.tracking import MlflowClient

    from .mlflow_store import prepare

    uri = tracking_uri(uri)
    prepare(uri)  # a local store is complete before MLflow opens it: a kill never leaves half of one
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means the store is unusable
        hint = ""
        if urlparse(uri).scheme in ("http", "https"):
            hint = (" Is the server running? Start one with `sweeper server`, or use the local store with "
                    f"--tracking-uri {DEFAULT_TRACKING_URI}.")
        reason = uris.redact(str(err).splitlines()[0] if str(err) else "", uri)
        raise TrackingError(f"MLflow tracking store {uris.public(uri)} is unreachable: {type(err).__name__}: "
                            f"{reason}.{hint}") from None
    return client


def check_server(uri: str) -> None:
    """A tracking server that does not answer is an error now, before a study starts (one request,
    without importing mlflow). The local store has nothing to check."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    netloc = parts.netloc.rpartition("@")[2]  # no user info: /health needs none, and urllib cannot send it
    health = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        urllib.request.urlopen(health, timeout=10).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (OSError, ValueError) as err:
        reason = uris.redact(getattr(err, "reason", err), uri)
        raise TrackingError(f"MLflow tracking store {uris.public(uri)} is unreachable: {reason}. Is the "
                            f"server running? Start one with `sweeper server`, or use the local store with "
                            f"--tracking-uri {DEFAULT_TRACKING_URI}.") from None


class LazyClient:
    """An MlflowClient built in a background thread (opening it takes seconds: imports, schema check);
    any use waits until it is there. Spooled items of this store are replayed first, so that nothing
    (a backfill, say) reads the runs before the spool has been delivered into them."""

    def __init__(self, uri: str, spool_dir: Path | None = None):
        self.tracking_uri = uri
        self._client = None
        self._error: Exception | None = None
        self._ready = threading.Event()
        self._spool_dir = spool_dir
        threading.Thread(target=self._build, name="mlflow-open", daemon=True).start()

    def _build(self) -> None:
        try:  # no round trip here: a server down right now is an outage to wait out, not an error
            from mlflow.tracking import MlflowClient

            from .mlflow_store import prepare

            prepare(self.tracking_uri)  # (a study prepared it before it started us: the fast path)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            replay_spool(self._client, self._spool_dir)  # keeps the files it cannot deliver yet
        except Exception as err:  # noqa: BLE001 - e.g. a local store that cannot be opened
            self._error = err
        finally:
            self._ready.set()

    def wait_ready(self) -> None:
        self._ready.wait()

    def __getattr__(self, name: str):
        self._ready.wait()
        if self._client is None:
            raise TrackingError(uris.redact(self._error, self.tracking_uri))
        return getattr(self._client, name)


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))


def start_run(client, experiment: str, run_name: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None, start_time: int | None = None) -> str:
    """A new run; `start_time` (ms since the epoch) is when it really started (a courier may create it
    later), and the run carries the environment's tags (`environment_tags`)."""
    all_tags = {**environment_tags(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(client, experiment), start_time=start_time, run_name=run_name,
                            tags=all_tags)
    return run.info.run_id


_ENV_TAGS: dict[str, str] | None = None


def environment_tags() -> dict[str, str]:
    """What produced a run: the git commit of the checkout sweeper runs from (MLflow's own
    `mlflow.source.git.*` tags: the UI's Version column), the versions of sweeper, torch, optuna and
    mlflow (read from the installed packages' metadata: nothing is imported), the host. Computed once
    per process."""
    global _ENV_TAGS
    if _ENV_TAGS is None:
        import socket
        from importlib import metadata

        tags = {"mlflow.source.name": "sweeper", "mlflow.source.type": "LOCAL", "sweeper.host": socket.gethostname()}
        for package in ("sweeper", "torch", "optuna", "mlflow"):
            try:
                tags[f"sweeper.version.{package}"] = metadata.version(package)
            except metadata.PackageNotFoundError:
                pass
        root = Path(__file__).resolve().parents[1]
        try:
            def git(*args: str) -> str:
                return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                      timeout=5, check=True).stdout.strip()

            if (root / ".git").exists():
                tags["mlflow.source.git.commit"] = git("rev-parse", "HEAD")
                tags["mlflow.source.git.branch"] = git("rev-parse", "--abbrev-ref", "HEAD")
                tags["sweeper.git.dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()
        except (OSError, subprocess.SubprocessError):
            pass  # no git, or not a checkout
        _ENV_TAGS = tags
    return dict(_ENV_TAGS)


def open_run(client, run_id: str | None, create: dict) -> str:
    """The run to log into: `run_id` if it exists, else the run tagged `sweeper.run_key` = create["key"]
    (one a killed process created but never recorded), else a new one. Marked RUNNING either way, so a
    resumed trial keeps logging into the same run."""
    from mlflow.exceptions import MlflowException

    parent = create.get("parent")  # the RunLogger of the parent run, opened by its own thread
    if parent is not None:
        if parent.run_id is None:
            raise RuntimeError("the parent run is not open yet")  # retried like an outage
        create = {**create, "parent_run_id": parent.run_id}
    if run_id:
        try:
            client.update_run(run_id, status="RUNNING")
            return run_id
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    exp = experiment_id(client, create["experiment"])
    key = create["key"].replace("'", "")
    found = client.search_runs([exp], filter_string=f"tags.`sweeper.run_key` = '{key}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    parent_id = create.get("parent_run_id")
    if parent_id is None and create.get("parent_key"):  # replayed from a spool: find the parent by its key
        parents = client.search_runs([exp], filter_string=f"tags.`sweeper.run_key` = '{create['parent_key']}'",
                                     max_results=1)
        parent_id = parents[0].info.run_id if parents else None
    tags = {**create.get("tags", {}), "sweeper.run_key": key}
    return start_run(client, create["experiment"], create["run_name"], parent_id, tags, create.get("start_time"))


def param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)
    return text[:MAX_PARAM_LENGTH]


class RunLogger:
    """Asynchronous, ordered, outage-proof logging into one MLflow run.

    With `create` (experiment, run_name, parent_run_id, tags, key) the run is opened by the background
    thread too (`open_run`: reuse, find by key, or create), so a trial starts training at once even while
    the tracking server is down; `run_id` is None until then."""

    IN_FLIGHT_S = 15.0  # how long `wait` lets a delivery in flight finish before spooling it too

    def __init__(self, client, run_id: str | None = None, spool_dir: Path | None = None, retry_max: float = 5.0,
                 create: dict | None = None, on_event=None):
        if run_id is None and create is None:
            raise ValueError("RunLogger needs a run_id or the arguments to create the run")
        self.client, self.run_id = client, (None if create is not None else run_id)
        self.create_key = create["key"] if create is not None else None
        self.spool_dir = Path(spool_dir) if spool_dir is not None else STATE_DIR / "spool"
        self.retry_max = retry_max
        self.on_event = on_event  # called from the thread: ("opened", run_id) and ("failure",)
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[tuple] = []  # taken from the queue, not yet delivered (in order)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failures = 0  # delivery attempts that failed (the server was down)
        self.spooled = False  # something went to the spool (its staged artifacts must stay)
        self.opened = threading.Event()  # the run exists and run_id is known
        if self.run_id is not None:
            self.opened.set()
        if create is not None:
            self._queue.put(("open", run_id, create))
        self._start()

    def _start(self) -> None:
        name = f"mlflow-{(self.run_id or self.create_key or '')[:16]}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, op: tuple) -> None:
        self._queue.put(op)

    # -- the calls training makes: they only enqueue ------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        stamp = int(time.time() * 1000)
        items = [(k, float(v), stamp, int(step or 0)) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._put(("metrics", items[i:i + MAX_METRICS_PER_BATCH]))

    def log_params(self, params: dict[str, Any]) -> None:
        items = [(k, param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._put(("params", items[i:i + MAX_PARAMS_PER_BATCH]))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put(("tags", [(k, str(v)) for k, v in tags.items()]))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._put(("artifact", str(local_path), artifact_path))

    def backfill(self, history: list[tuple[int, dict[str, float]]], key: str) -> None:
        """Log the epochs of `history` ((step, metrics) pairs) whose step the run lacks for metric `key`:
        a resumed trial's checkpoint may hold epochs that a killed process never delivered."""
        stamp = int(time.time() * 1000)
        self._put(("backfill", key, [(int(step), stamp, {k: float(v) for k, v in m.items()})
                                     for step, m in history]))

    def log_plot(self, path: str | Path, curves: dict[str, list[float]], title: str) -> None:
        """Render curves to a PNG and upload it, both in the background (matplotlib is slow to import
        and to draw; training should not wait for it)."""
        self._put(("plot", str(path), curves, title))

    def terminate(self, status: str = "FINISHED") -> None:
        """End the run now: its end time is this call's, not the delivery's."""
        self._put(("terminate", status, int(time.time() * 1000)))

    def set_experiment_tags(self, tags: dict[str, str]) -> None:
        """Tags of the run's experiment (how MLflow's UI opens it: see mlflow_ui.py)."""
        self._put(("exptags", {k: str(v) for k, v in tags.items()}))

    def log_inputs(self, datasets: list[dict]) -> None:
        """Dataset inputs: dicts of name, digest, source_type, source, schema, profile and context
        (the split: MLflow's `mlflow.data.context` input tag)."""
        self._put(("inputs", datasets))

    def log_model(self, state_path: str | Path, info: dict) -> None:
        """Build and log an MLflow PyTorch model in the background, from a file the trial saved
        (`torch.save` of {"config", "state_dict", "input_shape"}): see `log_pytorch_model`."""
        self._put(("model", str(state_path), info))

    def drop_models(self) -> None:
        """Delete the run's logged models (a study that keeps only its best k: `keep_models`)."""
        self._put(("dropmodels",))

    def system_metrics(self, interval: float = 2.0) -> None:
        """Log MLflow's system metrics (CPU, memory, disk, network, GPU when present) into the run from now
        until it is terminated, sampled every `interval` s by the process that delivers."""
        self._put(("sysmetrics", float(interval)))

    def wait_open(self, timeout: float) -> str | None:
        """The run id, waiting up to `timeout` s for the run to be opened, unless the store is failing
        (then at once: an outage must not hold anything up)."""
        if self.failures == 0:
            self.opened.wait(timeout)
        return self.run_id

    @property
    def pending(self) -> int:
        """Items not delivered yet."""
        return len(self._pending) + self._queue.qsize()

    def end(self, status: str | None = "FINISHED") -> None:
        """Queue the end of the run and return at once; the thread exits when all is delivered.
        `wait` (or `close`) later spools what could not be delivered."""
        if status is not None:
            self.terminate(status)
        self._put(("close",))

    def close(self, status: str | None = "FINISHED", timeout: float = 30.0) -> bool:
        """Deliver everything (waiting up to `timeout` s while the server is down); spool the rest.
        Returns True when all was delivered."""
        self.end(status)
        return self.wait(timeout)

    def join(self, timeout: float) -> bool:
        """After `end`: wait up to `timeout` s for delivery without giving up; True when all is delivered."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def wait(self, timeout: float = 30.0) -> bool:
        """After `end`: wait up to `timeout` s for delivery, spool the rest; True when all was delivered."""
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(self.IN_FLIGHT_S)  # a delivery in flight may take up to the HTTP timeout
        with self._lock:
            rest = self._pending + self._drain()
            self._pending = []
        rest = [op for op in rest if op[0] != "close"]
        if rest:
            self._spool(rest)
            self.spooled = True
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
        # A LazyClient imports mlflow in its own thread: importing mlflow modules here at the same time
        # can see them half-initialized, so nothing is delivered before it is done.
        getattr(self.client, "wait_ready", lambda: None)()
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
                self._done(op)
                return
            parent = op[2].get("parent") if op[0] == "open" else None
            if parent is not None and parent.run_id is None:  # a child run waits for its parent's
                if self._stop.is_set() or parent._stop.is_set():
                    return
                parent.opened.wait(0.25)
                continue
            try:
                opened = deliver(self.client, self.run_id, op)
                if op[0] == "open":
                    self.run_id = opened
                    self.opened.set()
                    if self.on_event is not None:
                        self.on_event("opened", opened)
            except Exception as err:  # noqa: BLE001 - the server is down or refused: keep and retry
                if rejected(err):  # retrying cannot help: say so and go on with the next item
                    log.warning("MLflow refused an item for run %s: %s", (self.run_id or "(new)")[:8],
                                uris.redact(err, self._uri()))
                    self._done(op)
                    continue
                self.failures += 1
                if self.on_event is not None:
                    self.on_event("failure")
                log.warning("MLflow delivery to run %s failed (%s); will retry", (self.run_id or "(new)")[:8],
                            uris.redact(str(err).splitlines()[0], self._uri()) if str(err) else type(err).__name__)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self.retry_max)
                continue
            delay = 0.25
            self._done(op)

    def _done(self, op: tuple) -> None:
        """`op` is delivered: off the pending list, unless `wait` gave up on this delivery in flight and
        spooled it (the spool's replay then delivers it again: at least once, never lost)."""
        with self._lock:
            if self._pending and self._pending[0] is op:
                self._pending.pop(0)

    def _uri(self) -> str | None:
        return getattr(self.client, "tracking_uri", None)

    def _spool(self, ops: list[tuple]) -> None:
        """The items in a file only this user can read (0600, in a 0700 directory: params and tags may be
        private too), headed by the store's URI with its password masked."""
        private_dir(self.spool_dir)
        path = self.spool_dir / f"{self.run_id or 'new'}-{uuid.uuid4().hex[:8]}.jsonl"
        tmp = path.with_suffix(".tmp")  # a replay elsewhere never sees half a file
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(json.dumps({"tracking_uri": uris.public(self._uri()), "run_id": self.run_id}) + "\n")
            for op in ops:
                fh.write(json.dumps(_portable(op)) + "\n")
        os.replace(tmp, path)
        log.warning("MLflow store unreachable: %d pending items of run %s kept in %s; they are delivered "
                    "by the next sweeper command that reaches it", len(ops), (self.run_id or "(new)")[:8], path)


def private_dir(path: Path) -> None:
    """`path` exists, and only its owner can list or enter it (made so when it is ours)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        st = path.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            path.chmod(0o700)  # made by an older version, or under a permissive umask
    except OSError:
        pass


def _portable(op: tuple) -> tuple:
    """An op as JSON can hold it: the parent logger of an "open" becomes its run id, or (never opened)
    the parent's key, found again by open_run."""
    if op[0] == "open" and op[2].get("parent") is not None:
        parent = op[2]["parent"]
        create = {k: v for k, v in op[2].items() if k != "parent"}
        create["parent_run_id"] = parent.run_id
        create["parent_key"] = parent.create_key
        return (op[0], op[1], create)
    return op


_PLOTTING = threading.Lock()
REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE"}


def rejected(err: Exception) -> bool:
    """The store answered and said no (e.g. a param logged again with another value): not an outage."""
    return getattr(err, "error_code", None) in REJECTED


def deliver(client, run_id: str | None, op: tuple) -> str | None:
    """Perform one queued operation; an "open" returns the run id it opened."""
    from mlflow.entities import Metric, Param, RunTag

    kind = op[0]
    if kind == "open":
        return open_run(client, op[1], op[2])
    if kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in op[1]], synchronous=True)
    elif kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in op[1]], synchronous=True)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op[1]], synchronous=True)
    elif kind == "artifact":
        client.log_artifact(run_id, op[1], op[2])
    elif kind == "backfill":
        have = {m.step for m in client.get_metric_history(run_id, op[1])}
        missing = [Metric(k, v, stamp, step) for step, stamp, values in op[2] if step not in have
                   for k, v in values.items()]
        for i in range(0, len(missing), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=missing[i:i + MAX_METRICS_PER_BATCH], synchronous=True)
    elif kind == "plot":
        with _PLOTTING:  # one render (and one first import of matplotlib) at a time
            render_curves(op[2], op[3], op[1])
        client.log_artifact(run_id, op[1])
    elif kind == "terminate":
        stop_system_metrics(run_id)
        client.set_terminated(run_id, status=op[1], end_time=op[2] if len(op) > 2 else None)
    elif kind == "exptags":
        exp = client.get_run(run_id).info.experiment_id
        for key, value in op[1].items():
            client.set_experiment_tag(exp, key, value)
    elif kind == "inputs":
        log_dataset_inputs(client, run_id, op[1])
    elif kind == "model":
        log_pytorch_model(client, run_id, op[1], op[2])
    elif kind == "dropmodels":
        with _MODEL_LOCK:  # after a model of the run being logged now
            experiment = client.get_run(run_id).info.experiment_id
            for model in client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'"):
                client.delete_logged_model(model.model_id)
    elif kind == "sysmetrics":
        start_system_metrics(client, run_id, op[1])
    else:  # pragma: no cover
        raise ValueError(f"unknown tracking op {kind}")


def log_dataset_inputs(client, run_id: str, datasets: list[dict]) -> None:
    """MLflow dataset inputs (the UI's Dataset column and the run page's Datasets), once per digest and
    context: a resumed trial logs them again."""
    with _INPUTS_LOCK:  # MLflow's store checks for the dataset, then inserts it: two runs at once collide
        try:
            _log_dataset_inputs(client, run_id, datasets)
        except Exception:  # noqa: BLE001 - another process inserted the same dataset meanwhile: it is there now
            time.sleep(0.5)
            _log_dataset_inputs(client, run_id, datasets)


_INPUTS_LOCK = threading.Lock()


def _log_dataset_inputs(client, run_id: str, datasets: list[dict]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    have = {(d.dataset.digest, next((t.value for t in d.tags if t.key == "mlflow.data.context"), None))
            for d in client.get_run(run_id).inputs.dataset_inputs}
    inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type=d.get("source_type", "local"),
                                   source=d["source"], schema=d.get("schema"), profile=d.get("profile")),
                           tags=[InputTag("mlflow.data.context", d["context"])])
              for d in datasets if (d["digest"], d["context"]) not in have]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


_MODEL_LOCK = threading.Lock()
# "pickle": the whole module pickled (torch.save), so loading it needs this project's model classes
# importable; "pt2" (torch.export) would not, but traces every model: seconds of the courier per trial.
MODEL_FORMAT = os.environ.get("SWEEPER_MODEL_FORMAT", "pickle")


def log_pytorch_model(client, run_id: str, checkpoint_dir: str, info: dict) -> None:
    """An MLflow PyTorch model ("model" of the run: `mlflow.pytorch.load_model("runs:/ID/model")`, or
    `models:/MODEL_ID`) with its input signature (normalized images [N, C, H, W] -> logits [N, classes]),
    built from the trial's last checkpoint: the model its last evaluation measured (one model's weights,
    or the K workers' average: `trainers.checkpoints.evaluated_state`). Torch and the trainer core are
    imported here, in the courier, only when a study logs a model; one model at a time, at the courier's
    low priority. A checkpoint gone, or one without a model (a dist rank's), is a warning and no model."""
    path = Path(checkpoint_dir) / "checkpoint.pt"
    if not path.exists():
        log.warning("no checkpoint in %s; run %s gets no model", checkpoint_dir, run_id[:8])
        return
    with _MODEL_LOCK:
        import mlflow
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from trainers.checkpoints import evaluated_state
        from trainers.config import TrainConfig
        from trainers.models import build_model

        payload = torch.load(path, map_location="cpu", weights_only=False)
        cfg = TrainConfig.from_dict(info["config"])
        channels, size, classes = info["input_shape"]
        model = build_model(cfg.model, channels, size, classes)
        if evaluated_state(payload, model) is None:
            log.warning("run %s: its checkpoint holds no model to log", run_id[:8])
            return
        model.eval()
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, size, size))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]))
        mlflow.set_tracking_uri(client.tracking_uri)
        mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)  # the model's, too
        meta = {k: v for k, v in info.items() if k != "config"}
        example = np.zeros((2, channels, size, size), dtype=np.float32)
        try:
            mlflow.pytorch.log_model(model, name="model", run_id=run_id, signature=signature,
                                     input_example=example, serialization_format=MODEL_FORMAT,
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                     metadata={k: str(v) for k, v in meta.items()},
                                     params={k: str(v) for k, v in meta.items()}, step=int(info.get("epoch", 0)))
        except Exception as err:  # noqa: BLE001 - a model that cannot be saved is no outage: say so, go on
            log.warning("run %s: the model could not be logged: %s: %s", run_id[:8], type(err).__name__,
                        str(err).splitlines()[0] if str(err) else "")
            client.set_tag(run_id, "sweeper.model_error", f"{type(err).__name__}: {err}"[:5000])


_MONITORS: dict[str, Any] = {}


def start_system_metrics(client, run_id: str, interval: float) -> None:
    """MLflow's SystemMetricsMonitor on this run (in this process: the courier), until `terminate`."""
    if run_id in _MONITORS:
        return
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True,
                                       tracking_uri=client.tracking_uri)
    except Exception as err:  # noqa: BLE001 - e.g. psutil missing: the run goes on without them
        log.warning("no system metrics for run %s: %s", run_id[:8], err)
        return
    monitor.start()
    _MONITORS[run_id] = monitor


def stop_system_metrics(run_id: str | None) -> None:
    monitor = _MONITORS.pop(run_id, None) if run_id else None
    if monitor is not None:
        monitor.finish()


def render_curves(curves: dict[str, list], title: str, path: str | Path) -> Path:
    """A trial's loss and accuracy per epoch (train and eval), as a PNG. It lives here, with matplotlib's
    object API alone (no pyplot state: safe off the main thread), rather than in report.py: importing
    that imports torch (through the spec), ~2.5 s of the courier's CPU per study that training pays for
    on a machine with no idle core. Fixed margins rather than tight_layout halve the drawing time."""
    import math

    from matplotlib.figure import Figure  # no pyplot state: safe off the main thread

    fig = Figure(figsize=(9.0, 3.4))
    loss, acc = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.87, wspace=0.25)
    epochs = curves.get("epoch", [])
    for ax, kind in ((loss, "loss"), (acc, "acc")):
        for split in ("train", "eval"):
            ys = curves.get(f"{split}_{kind}") or []
            ax.plot(epochs[:len(ys)], [math.nan if y is None else y for y in ys], label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy [%]" if kind == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=80)
    return Path(path)


def replay_spool(client, spool_dir: Path | None = None) -> int:
    """Deliver spooled items for this tracking URI; returns how many files were delivered."""
    spool_dir = Path(spool_dir) if spool_dir is not None else STATE_DIR / "spool"
    done = 0
    for path in sorted(spool_dir.glob("*.jsonl")) if spool_dir.exists() else []:
        try:
            lines = path.read_text().splitlines()
            head = json.loads(lines[0])
        except (OSError, ValueError, IndexError):
            continue  # replayed by another sweeper process meanwhile, or being written
        if uris.public(head["tracking_uri"]) != uris.public(client.tracking_uri):
            continue  # another store's (compared masked: files hold the URI without its password)
        run_id = head["run_id"]
        try:
            for line in lines[1:]:
                op = tuple(json.loads(line))
                if op[0] == "sysmetrics":
                    continue  # the time they would have measured is past
                opened = deliver(client, run_id, op)
                run_id = opened if op[0] == "open" else run_id
        except Exception as err:  # noqa: BLE001 - still down: keep the file for next time
            log.warning("spooled items in %s not delivered yet: %s", path, uris.redact(err, client.tracking_uri))
            continue
        path.unlink(missing_ok=True)
        done += 1
    return done


# --------------------------------------------------------------------------------------------------
# The courier: a child process that owns the MLflow client and the loggers of a study.


class Courier:
    """Starts `python -m sweeper.tracking SPOOL_DIR` and talks to it over its stdin/stdout (pickled
    messages; a writer thread, so a slow child never blocks the caller). The tracking URI is the first
    message, not an argument: `ps` shows arguments to every user, and the URI may hold a password. The
    child dies with us: a SIGKILL of the study leaves nothing delivering behind it (a retry then
    backfills from checkpoints without racing it)."""

    def __init__(self, uri: str, spool_dir: Path | None = None):
        self.tracking_uri = uri
        self.spool_dir = Path(spool_dir or STATE_DIR / "spool").resolve()
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-m", "sweeper.tracking", str(self.spool_dir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.loggers: dict[int, RemoteLogger] = {}
        self.spooled = 0
        self.error: str | None = None
        self._outbox: queue.Queue = queue.Queue()
        self._outbox.put(("uri", uri))  # the first message: the store to deliver to
        self._bye = threading.Event()
        threading.Thread(target=self._write, name="courier-out", daemon=True).start()
        threading.Thread(target=self._read, name="courier-in", daemon=True).start()

    def send(self, message: tuple) -> None:
        self._outbox.put(message)

    def _write(self) -> None:
        try:
            while (message := self._outbox.get()) is not None:
                pickle.dump(message, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self.proc.stdin.flush()
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the child is gone; _read says so

    def _read(self) -> None:
        while True:
            try:
                kind, *args = pickle.load(self.proc.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            if kind == "bye":
                self.spooled = args[0]
                self._bye.set()
            elif kind == "error":
                self.error = args[0]
            else:
                self.loggers[args[0]]._event(kind, *args[1:])
        for logger in self.loggers.values():  # nothing more will come: waits end now
            logger._event("finished", False, False)
        self._bye.set()

    @property
    def alive(self) -> bool:
        return not self._bye.is_set()

    def shutdown(self, timeout: float) -> int:
        """Let every logger deliver for up to `timeout` s, spool the rest, stop the child; returns the
        number of runs that were spooled."""
        self.send(("shutdown", timeout))
        self.send(None)
        self._bye.wait(timeout + 30)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return self.spooled


def logger_for(client, run_id: str | None = None, create: dict | None = None) -> RunLogger:
    """A logger for `client`: in the courier when it is one, else a thread of this process."""
    if isinstance(client, Courier):
        return RemoteLogger(client, run_id, create)
    return RunLogger(client, run_id, STATE_DIR / "spool", create=create)


class RemoteLogger(RunLogger):
    """A RunLogger whose thread lives in the courier: the calls build the same items and send them."""

    _ids = iter(range(1, 1 << 62))

    def __init__(self, courier: Courier, run_id: str | None = None, create: dict | None = None):
        self.lid = next(RemoteLogger._ids)
        self.courier = courier
        self._finished = threading.Event()
        self.delivered = False
        courier.loggers[self.lid] = self
        if create is not None and create.get("parent") is not None:
            create = {**{k: v for k, v in create.items() if k != "parent"}, "parent_lid": create["parent"].lid}
        super().__init__(courier, run_id, courier.spool_dir, create=None if create is None else {**create})
        courier.send(("new", self.lid, run_id, create))

    def _start(self) -> None:
        self._queue = None  # no local thread: the courier's logger holds the items

    def _put(self, op: tuple) -> None:
        if op[0] != "open":  # the courier's logger queues its own "open"
            self.courier.send(("op", self.lid, op))

    def _event(self, kind: str, *args) -> None:
        if kind == "opened":
            self.run_id = args[0]
            self.opened.set()
        elif kind == "failure":
            self.failures += 1
        elif kind == "finished":
            if not self._finished.is_set():
                self.delivered, self.spooled = args
                self._finished.set()

    @property
    def pending(self) -> int:
        return 0 if self._finished.is_set() else 1  # unknown here: "something, until it says done"

    def wait_open(self, timeout: float) -> str | None:
        return super().wait_open(timeout if self.courier.alive else 0.0)

    def join(self, timeout: float) -> bool:
        return self._finished.wait(timeout) and self.delivered

    def wait(self, timeout: float = 30.0) -> bool:
        if not self._finished.wait(timeout):
            self.courier.send(("abort", self.lid))
            self._finished.wait(30)
        return self.delivered


COURIER_NICENESS = 10


def courier_main(spool_dir: str) -> None:
    """The child: the first message ("uri", URI) names the store; then a RunLogger per message "new", ops
    appended to it, "abort" spools one, "shutdown" waits for all and spools the rest. Its stdout carries
    only our messages (prints go to stderr)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the study decides
    # Below the study's priority: where no core is idle, training goes first and the deliveries take the
    # CPU it leaves (the study waits for them only at its end). The courier's MLflow import and store
    # writes took 4.3-4.4 s of CPU in a study of 8 trials x 5 epochs (the `sweeper bench --study` grid).
    os.nice(COURIER_NICENESS)
    # MLflow's INFO lines (system metrics started/stopped) and its pickle warning, once per trial, would
    # go to the study's console.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    inbox = os.fdopen(0, "rb")
    outbox = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    lock = threading.Lock()

    def emit(*message) -> None:
        with lock:
            pickle.dump(message, outbox, protocol=pickle.HIGHEST_PROTOCOL)
            outbox.flush()

    try:
        kind, uri = pickle.load(inbox)
    except (EOFError, OSError, ValueError, pickle.UnpicklingError):
        os._exit(0)  # our study process is gone before it said where to deliver
    if kind != "uri":
        os._exit(2)
    client = LazyClient(uri, Path(spool_dir))
    loggers: dict[int, RunLogger] = {}

    def watch(lid: int, logger: RunLogger) -> None:  # a logger whose thread ends by itself delivered all
        logger._thread.join()
        if not logger._stop.is_set():
            emit("finished", lid, True, False)

    while True:
        try:
            message = pickle.load(inbox)
        except (EOFError, OSError):
            os._exit(0)  # our study process is gone (killed): stop at once, like its threads would
        kind = message[0]
        if kind == "new":
            _, lid, run_id, create = message
            if create is not None and "parent_lid" in create:
                create = {**{k: v for k, v in create.items() if k != "parent_lid"},
                          "parent": loggers[create["parent_lid"]]}
            logger = RunLogger(client, run_id, Path(spool_dir), create=create,
                               on_event=lambda event, *args, lid=lid: emit(event, lid, *args))
            loggers[lid] = logger
            threading.Thread(target=watch, args=(lid, logger), daemon=True).start()
        elif kind == "op":
            loggers[message[1]]._put(message[2])
        elif kind == "abort":
            logger = loggers[message[1]]
            emit("finished", message[1], logger.wait(0.5), logger.spooled)
        elif kind == "shutdown":
            deadline = time.monotonic() + message[1]
            spooled = 0
            for logger in loggers.values():  # a logger the study never ended ends now
                logger._put(("close",))
            for lid, logger in loggers.items():
                delivered = logger.wait(max(0.1, deadline - time.monotonic()))
                spooled += not delivered
                emit("finished", lid, delivered, logger.spooled)  # (the parent keeps the first it gets)
            if client._error is not None:
                emit("error", f"{type(client._error).__name__}: {uris.redact(client._error, uri)}")
            emit("bye", spooled)
            outbox.close()
            os._exit(0)


if __name__ == "__main__":  # the courier child of a study
    courier_main(sys.argv[1])
