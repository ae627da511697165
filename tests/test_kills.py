"""Kill a study at any moment and run it again: nothing is lost or repeated. SIGKILLs at random moments
on fresh stores (where MLflow's store is still being created), kills landed inside each narrow window by
fault points (`SWEEPER_KILL_AT`), and a worker of `--workers 2` killed while the other goes on. Every
check reads the stores themselves: Optuna's trials, MLflow's runs, metric histories and artifacts."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from conftest import TINY_BASE, busy_workers, subprocess_env, sweeper_cmd, write_spec
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweeper import study as st

pytestmark = pytest.mark.slow

EPOCHS = 2
BASE = {**TINY_BASE, "epochs": EPOCHS}
GRID = {"optim.lr": [0.02, 0.05, 0.1]}
FAST_RECOVERY = {"SWEEPER_HEARTBEAT_INTERVAL": "1", "SWEEPER_HEARTBEAT_GRACE": "2"}


def start(workdir: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(sweeper_cmd(*args), cwd=workdir, env=subprocess_env(workdir, **FAST_RECOVERY, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(workdir: Path, *args: str, timeout: float = 300) -> str:
    proc = start(workdir, *args)
    out = proc.communicate(timeout=timeout)[0].decode()
    assert proc.returncode == 0, out
    return out


def kill_after(proc: subprocess.Popen, seconds: float) -> None:
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the study and its courier, as a machine's crash would
    proc.communicate()


def finals(db: Path, name: str) -> dict[float, float]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    return {t.params["optim.lr"]: t.value for t in study.trials if t.state == TrialState.COMPLETE}


def check_stores(workdir: Path, name: str, points: int = len(GRID["optim.lr"])) -> dict[float, float]:
    """One COMPLETE trial per grid point and none left RUNNING or WAITING; one parent run with the report,
    exactly one child run per trial, FINISHED, each per-epoch metric at steps 1..E once; no checkpoint
    left. Returns the final values by lr."""
    db = workdir / "mlruns" / "optuna.db"
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs[st.T_POINT] for t in complete) == list(range(points))
    assert not [t.number for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweeper.kind") == "study"]
    assert len(parents) == 1 and parents[0].info.run_id == study.user_attrs[st.A_PARENT]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert "report/report.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert study.user_attrs[st.A_REPORT] == f"{points}/{points}"
    children = [r for r in runs if r is not parent and r.data.tags.get("sweeper.kind") != "study"]
    assert sorted(int(r.data.tags["optuna.origin_trial"]) for r in children) == sorted(st.origin(t) for t in complete)
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.info.status == "FINISHED"
        for key in ("eval_acc", "train_loss", "epoch_time"):
            assert [m.step for m in sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)] \
                == list(range(1, EPOCHS + 1)), (key, r.info.run_name)
    assert not (workdir / "mlruns" / "checkpoints" / name).exists()
    return {t.params["optim.lr"]: t.value for t in complete}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[float, float]:
    """The final values of the grid run once, uninterrupted."""
    workdir = tmp_path_factory.mktemp("reference")
    spec = write_spec(workdir / "ref.yaml", "ref", base=BASE, grid=GRID)
    finish(workdir, "study", "run", str(spec), "--quiet")
    return check_stores(workdir, "ref")


def test_random_sigkills_on_fresh_stores(workdir, reference):
    """Kills in the first seconds of a first study (MLflow's store being built, the study being created and
    queued, the first trials), then later ones; each time on a fresh mlruns/ for the first kill."""
    rng = random.Random(12)
    spec = write_spec(workdir / "r.yaml", "r", base=BASE, grid=GRID)
    for delay in sorted(rng.uniform(0.5, 9.0) for _ in range(4)):
        kill_after(start(workdir, "study", "run", str(spec), "--quiet"), delay)
    finish(workdir, "study", "run", str(spec), "--quiet")
    assert check_stores(workdir, "r") == reference


@pytest.mark.parametrize("window", ["asked", "heartbeat", "report-written"])
def test_a_kill_in_each_window_is_recovered(workdir, reference, window):
    """asked: the trial is RUNNING with no heartbeat and no worker; heartbeat: no worker record yet;
    report-written: the study is complete, its report written but not on the parent run."""
    spec = write_spec(workdir / "w.yaml", "w", base=BASE, grid=GRID)
    proc = start(workdir, "study", "run", str(spec), "--quiet", SWEEPER_KILL_AT=window)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == -signal.SIGKILL, out
    study = optuna.load_study(study_name="w", storage=f"sqlite:///{workdir / 'mlruns' / 'optuna.db'}")
    if window == "report-written":
        assert st.A_REPORT not in study.user_attrs
    else:
        assert [t.state for t in study.trials][:1] == [TrialState.RUNNING]
    out = finish(workdir, "study", "run", str(spec), "--quiet")
    assert check_stores(workdir, "w") == reference


def test_a_killed_worker_is_replaced_by_the_other_in_the_same_command(workdir):
    """--workers 2, one SIGKILLed mid-trial: the other retries its trial at once (its pid is gone) and
    completes the study; the command exits 0 because the study is complete, and says what happened."""
    base = {**BASE, "data": {**BASE["data"], "synthetic": {**BASE["data"]["synthetic"], "train_size": 600}}}
    spec = write_spec(workdir / "k.yaml", "k", base=base, grid={"optim.lr": [0.01, 0.02, 0.05, 0.1]})
    proc = start(workdir, "study", "run", str(spec), "--workers", "2", "--quiet")
    db = workdir / "mlruns" / "optuna.db"
    deadline = time.monotonic() + 240
    while len(busy := busy_workers(db)) < 2:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the two workers never trained at the same time"
        time.sleep(0.05)
    os.kill(min(busy), signal.SIGKILL)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out
    assert "the other workers completed the study" in out and "retry of trial" in out
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{db}")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs[st.T_POINT] for t in complete) == [0, 1, 2, 3]
    assert TrialState.RUNNING not in {t.state for t in study.trials}
    assert study.user_attrs[st.A_REPORT] == "4/4"
