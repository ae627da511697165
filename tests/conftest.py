"""Shared fixtures and helpers: a real MLflow tracking server on a free loopback port, tiny synthetic
study specs, a working directory per test (the local state lives in ./mlruns), and the queries tests
make of MLflow and of the Optuna SQLite storage.

Tests marked `slow` (they train on real data, start servers or `sweeper` processes, or take seconds)
are left out by `make test-fast` (`pytest -m "not slow"`); `make test` runs everything."""
from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# One intra-op thread for the tiny models of the tests (and the subprocesses they start): with few cores
# shared with an MLflow server, a second OpenMP thread makes these steps slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_BASE = {
    "data": {"dataset": "synthetic", "augment": False,
             "synthetic": {"train_size": 320, "test_size": 64, "channels": 1, "image_size": 16, "classes": 4}},
    "model": {"name": "lenet5-classic"},
    "optim": {"name": "sgdm", "lr": 0.05},
    "epochs": 2,
    "batch_size": 32,
    "device": "cpu",
}


@pytest.fixture(autouse=True)
def _collectable_again():
    """`study.run` freezes the objects alive before its trials (for a study's process, which ends with its
    study); this process runs many studies, so each test gives them back to the collector."""
    yield
    gc.unfreeze()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`python -m mlflow server` on 127.0.0.1:PORT over a SQLite store; stop() and start() again keep
    the port and the store (an outage and a recovery)."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def launch(self) -> None:
        """Start the process; `start` (or `wait`) waits until it answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner
        with open(self.root / "server.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, timeout: float = 120.0) -> None:
        self.launch()
        self.wait(timeout)

    def wait(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            if self.healthy():
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError("mlflow server did not answer /health in time")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        try:  # the server forks uvicorn workers: end the whole session we started
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        deadline = time.monotonic() + 10
        while self.healthy() and time.monotonic() < deadline:
            time.sleep(0.1)


class _SessionServer:
    """The session's one MLflow server, launched on first demand."""

    def __init__(self):
        self.server: MlflowServer | None = None

    def launch(self) -> MlflowServer:
        if self.server is None:
            self.server = MlflowServer(Path(tempfile.mkdtemp(prefix="mlflow-server-")))
            self.server.launch()
        return self.server


@pytest.fixture(scope="session", autouse=True)
def _mlflow_server_boot(request):
    """Launches the server at the first test's setup when a selected test needs it (it boots while the
    tests that do not need it run), and stops it at the end of the session. Collection starts nothing."""
    holder = _SessionServer()
    if any("mlflow_server" in getattr(item, "fixturenames", ()) for item in request.session.items):
        holder.launch()
    yield holder
    if holder.server is not None:
        holder.server.stop()
        shutil.rmtree(holder.server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(_mlflow_server_boot):
    """The session's MLflow server, answering /health."""
    server = _mlflow_server_boot.launch()
    if not server.healthy():
        server.wait()
    return server


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh directory as cwd: mlruns/ (Optuna DB, MLflow store, checkpoints, spool) lands here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SWEEPER_STORAGE", raising=False)
    monkeypatch.delenv("SWEEPER_STATE_DIR", raising=False)
    return tmp_path


def write_spec(path: Path, study_name: str, **fields) -> Path:
    """A tiny synthetic grid spec (2 epochs, a few hundred 16x16 images), with `fields` replacing keys."""
    spec = {"name": study_name, "kind": "grid", "base": TINY_BASE, "grid": {"optim.lr": [0.05, 0.1]}, "seeds": [0]}
    spec.update(fields)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweeper_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sweeper.cli", *args]


def subprocess_env(workdir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def pop_race(storage, threads: int, points: int) -> list[int]:
    """`points` grid points queued, then `threads` threads (each its own pooled storage connection) ask
    for trials at the same moment until the queue is empty; returns the points they took, sorted."""
    import threading
    import warnings

    from sweeper import study as st
    from sweeper.spec import StudySpec

    spec = StudySpec.from_dict({"name": "pops", "kind": "grid", "base": TINY_BASE,
                                "grid": {"optim.lr": [0.01 * (i + 1) for i in range(points)]}})
    study = st.open_study(spec, storage)
    barrier = threading.Barrier(threads)
    taken: list[int] = []

    def take() -> None:
        barrier.wait()
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trial = study.ask()
            point = study.get_trials(deepcopy=False)[trial.number].user_attrs.get(st.T_POINT)
            if point is None:  # the queue was empty: a fresh trial, not a point
                return
            taken.append(point)

    pool = [threading.Thread(target=take) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sorted(taken)


def busy_workers(db: Path) -> set[int]:
    """Pids of the workers whose RUNNING trial has reported at least one epoch (SQLite storage `db`)."""
    import json
    import sqlite3

    from sweeper.study import T_WORKER

    try:
        with sqlite3.connect(db, timeout=5) as con:
            rows = con.execute(
                "select a.value_json from trials t join trial_user_attributes a on a.trial_id = t.trial_id "
                "and a.key = ? where t.state = 'RUNNING' and exists (select 1 from trial_intermediate_values v "
                "where v.trial_id = t.trial_id)", (T_WORKER,)).fetchall()
    except sqlite3.Error:
        return set()
    return {json.loads(value)["pid"] for (value,) in rows}


# -- what tests read back -----------------------------------------------------------------------------


def child_runs(client, name: str, parent: str):
    """The MLflow child runs of parent run `parent` in experiment `name`."""
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def run_of(client, name: str, origin: int):
    """The one MLflow child run of a trial's retry chain (found by tag: the courier may record the id
    in Optuna only after the trial ended)."""
    exp = client.get_experiment_by_name(name)
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`optuna.origin_trial` = '{origin}'")
    return run


def steps(client, run_id: str, key: str = "eval_acc") -> list[int]:
    """The steps at which run `run_id` logged metric `key`, sorted."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def first_epoch_logged(db: Path, number: int) -> bool:
    """Whether trial `number` reported an epoch to Optuna (SQLite storage `db`), read without Optuna so
    that a test can poll a study another thread or process runs."""
    import sqlite3

    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("select count(*) from trial_intermediate_values v join trials t on "
                               "t.trial_id = v.trial_id where t.number = ?", (number,)).fetchone()[0] > 0
    except sqlite3.Error:
        return False
