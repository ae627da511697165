"""The local MLflow store is complete or absent at every moment (sweeper/mlflow_store.py): a kill during
its creation, parallel workers creating it at once, and stores that an older sweeper or MLflow left
half-built or at an old schema."""
from __future__ import annotations

import glob
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient

from sweeper import mlflow_store

PREPARE = "import sys; from sweeper.mlflow_store import prepare; prepare(sys.argv[1])"

pytestmark = pytest.mark.slow


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def store(tmp_path: Path) -> tuple[str, Path]:
    path = tmp_path / "mlruns" / "mlflow.db"
    return f"sqlite:///{path}", path


def works(uri: str) -> str:
    """Open the store the way the courier does, write a run into it; returns the run id."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(f"e{time.monotonic_ns()}")
    run = client.create_run(exp, run_name="r")
    client.log_metric(run.info.run_id, "acc", 0.5, step=1)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def leftovers(path: Path) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(f"{path}.*") if not p.endswith(".lock"))


def test_fresh_store_opens_and_a_second_prepare_is_a_noop(tmp_path):
    uri, path = store(tmp_path)
    mlflow_store.prepare(uri)
    run_id = works(uri)
    before = os.stat(path)
    mlflow_store.prepare(uri)  # (its cost is a figure of BENCHMARKS.md, not an assertion)
    # and in a process of its own: the fast path imports no MLflow
    check = "import sys; from sweeper.mlflow_store import prepare; prepare(sys.argv[1]); print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check, uri], env=env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert MlflowClient(uri).get_run(run_id).data.metrics == {"acc": 0.5}
    assert leftovers(path) == []
    assert mlflow_store.prepare("http://127.0.0.1:9/") is None  # a server's schema is not ours: nothing to do


def building(path: Path) -> bool:
    return bool(glob.glob(f"{path}.building-*"))


def wait_until(condition, proc: subprocess.Popen) -> None:
    while not condition():
        assert proc.poll() is None, "prepare exited early"
        time.sleep(0.01)


def test_a_kill_at_any_moment_leaves_no_store_or_a_complete_one(tmp_path):
    uri, path = store(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", PREPARE, uri], env=env(), stderr=subprocess.DEVNULL)
    wait_until(lambda: building(path), proc)  # measure the build: from its temporary file to the rename
    start = time.monotonic()
    wait_until(path.exists, proc)
    build = time.monotonic() - start
    assert proc.wait() == 0 and not building(path)
    path.unlink()
    for fraction in (0.02, 0.25, 0.5, 0.75, 0.98):  # kills spread over the build: each lands inside it
        proc = subprocess.Popen([sys.executable, "-c", PREPARE, uri], env=env(), stderr=subprocess.DEVNULL)
        wait_until(lambda: building(path), proc)
        time.sleep(fraction * build)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if path.exists():  # the kill came after the rename: then the store is complete
            works(uri)
            break
        assert building(path)  # the killed build's leftover, removed by the next prepare
    mlflow_store.prepare(uri)
    works(uri)
    assert leftovers(path) == []


# -- stores left by older versions ----------------------------------------------------------------


def old_store(path: Path, half_built: bool, with_run: bool) -> None:
    """A store MLflow migrated to an early revision; `half_built` adds a table a later migration creates
    (a kill between that migration's DDL and its version stamp), `with_run` a run with a metric."""
    from alembic import command
    from alembic.script import ScriptDirectory
    from mlflow.store.db.base_sql_model import Base
    from mlflow.store.db.utils import _get_alembic_config, create_sqlalchemy_engine
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    revisions = [s.revision for s in ScriptDirectory.from_config(_get_alembic_config("")).walk_revisions()]
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_sqlalchemy_engine(f"sqlite:///{path}")
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(str(engine.url))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revisions[-4])  # the 4th migration from the first
    if half_built:
        with sqlite3.connect(path) as db:
            present = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        Base.metadata.tables[sorted(set(Base.metadata.tables) - present)[0]].create(engine)
    engine.dispose()
    if with_run:
        with sqlite3.connect(path) as db:
            db.execute("INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage) "
                       "VALUES (1, 'old', 'file:///tmp/old', 'active')")
            db.execute("INSERT INTO runs (run_uuid, name, source_type, status, start_time, lifecycle_stage, "
                       "experiment_id, artifact_uri, user_id) VALUES ('r1', 'old-run', 'LOCAL', 'FINISHED', 1, "
                       "'active', 1, 'file:///tmp/old/r1', 'me')")
            db.execute("INSERT INTO metrics (key, value, timestamp, run_uuid) VALUES ('acc', 0.75, 1, 'r1')")


def test_a_half_built_store_without_runs_is_moved_aside_and_rebuilt(tmp_path, caplog):
    uri, path = store(tmp_path)
    old_store(path, half_built=True, with_run=False)
    (tmp_path / "mlruns" / "mlflow.db.building-999").write_bytes(b"a killed build")
    mlflow_store.prepare(uri)
    works(uri)
    names = leftovers(path)
    assert len(names) == 1 and names[0].startswith("mlflow.db.broken-")  # kept, not deleted
    assert "half-built" in caplog.text


def test_an_old_store_with_runs_is_upgraded_and_a_broken_one_refused(tmp_path):
    uri, path = store(tmp_path / "old")
    old_store(path, half_built=False, with_run=True)
    mlflow_store.prepare(uri)
    client = MlflowClient(uri)
    assert client.get_run("r1").data.metrics == {"acc": 0.75}
    works(uri)
    names = leftovers(path)
    assert len(names) == 1 and names[0].startswith("mlflow.db.pre-upgrade-")

    uri, path = store(tmp_path / "broken")
    old_store(path, half_built=True, with_run=True)
    before = path.read_bytes()
    with pytest.raises(mlflow_store.StoreError, match="mlflow db upgrade"):
        mlflow_store.prepare(uri)
    assert path.read_bytes() == before and leftovers(path) == []  # untouched: its runs are the user's


def test_parallel_workers_prepare_the_same_new_store(tmp_path):
    uri, path = store(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE, uri], env=env(), stderr=subprocess.PIPE)
             for _ in range(2)]
    for proc in procs:
        assert proc.wait(120) == 0, proc.stderr.read().decode()[-2000:]
        # a new store is built silently: MLflow's "Creating initial MLflow database tables..." INFO lines
        # would land in the middle of a study's first trial
        assert "database tables" not in proc.stderr.read().decode()
    works(uri)
    assert leftovers(path) == []
