"""`study run --workers N` on the default SQLite storage: N processes share one study, Ctrl-C stops them
all and says how to resume, the resume completes every grid point once; and the two mechanisms that keep
concurrent workers honest: the compare-and-set that elects the worker which ends the study, and the rule
that two workers picking one grid point at once leave it to the lower trial number."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from types import SimpleNamespace

import optuna
import pytest
from conftest import TINY_BASE, claim_race, subprocess_env, sweeper_cmd, write_spec
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from test_study import child_runs

from sweeper import study as st
from sweeper.spec import StudySpec, SpecError, load_spec
from sweeper.workers import check_storage, worker_env


def test_claim_completion_has_one_winner_on_sqlite(workdir):
    storage = st.open_storage()
    study = optuna.create_study(study_name="claims", storage=storage)
    assert claim_race(study, 6, "3/3") == [False] * 5 + [True]
    assert not st.claim_completion(study, "3/3") and st.claim_completion(study, "5/5")


def test_a_grid_point_taken_twice_goes_to_the_lower_trial(workdir):
    """Trial 0 is still picking its point (RUNNING, no grid_id) when trial 1, which picked point 0, checks:
    trial 1 waits for trial 0's pick instead of deciding on what it cannot see yet, and yields the point."""
    spec = StudySpec.from_dict({"name": "race", "kind": "grid", "base": TINY_BASE,
                                "grid": {"optim.lr": [0.05, 0.1]}, "seeds": [0]})
    study = st.open_study(spec, st.open_storage())
    storage = study._storage
    new_trial = lambda: storage.create_new_trial(study._study_id)  # RUNNING, no point yet (no sampler)  # noqa: E731
    lower, higher = new_trial(), new_trial()
    storage.set_trial_system_attr(higher, "grid_id", 0)
    polled = threading.Event()
    real = storage.get_all_trials

    def watched(*args, **kw):
        trials = real(*args, **kw)
        polled.set()  # after the read: the first look never includes the pick
        return trials

    storage.get_all_trials = watched
    other = st.open_storage()  # trial 0's worker: another process's view of the storage

    def pick() -> None:  # it writes its pick only once trial 1 has looked
        polled.wait(30)
        other.set_trial_system_attr(lower, "grid_id", 0)

    picker = threading.Thread(target=pick)
    picker.start()
    runner = SimpleNamespace(study=study)
    assert st.Runner._taken(runner, storage.get_trial(higher)) is True
    picker.join()
    assert st.Runner._taken(runner, storage.get_trial(lower)) is False  # the lower one keeps it
    # A trial that never writes its pick (its worker died in that instant) holds nobody up for long.
    new_trial()
    storage.set_trial_system_attr(higher, "grid_id", 1)
    newer = new_trial()
    storage.set_trial_system_attr(newer, "grid_id", 1)
    assert st.Runner._taken(runner, storage.get_trial(newer), settle=0.3) is True  # (by `higher`)


def test_a_tune_budget_is_not_overshot_by_concurrent_workers(workdir):
    """Budget 3, 1 trial finished, trials a < b < c running in three workers: a and b run; c would be one
    too many if they finish, so it waits, and runs if one of them fails, or is skipped (its worker stops)
    once they finish. A queued retry goes before a new trial."""
    spec = StudySpec.from_dict({"name": "budget", "kind": "tune", "base": TINY_BASE, "budget": 3,
                                "search": {"optim.lr": {"low": 0.01, "high": 0.2, "log": True}}})
    study = st.open_study(spec, st.open_storage())
    storage = study._storage
    study.tell(study.ask(), 1.0)
    a, b, c = (storage.create_new_trial(study._study_id) for _ in range(3))
    runner = SimpleNamespace(study=study, spec=spec)
    looks = []
    real = storage.get_all_trials

    def counted(*args, **kw):
        looks.append(1)
        return real(*args, **kw)

    storage.get_all_trials = counted

    def full(trial_id, then=None):  # `then` happens while the trial waits (after its first look)
        looks.clear()
        if then is not None:
            def act():
                while not looks:
                    time.sleep(0.01)
                then()
            threading.Thread(target=act).start()
        return st.Runner._budget_full(runner, storage.get_trial(trial_id), poll=0.05)

    assert full(a) is None and full(b) is None
    assert full(c, then=lambda: storage.set_trial_state_values(a, TrialState.FAIL)) is None and len(looks) > 1
    d = storage.create_new_trial(study._study_id)
    assert full(d, then=lambda: [storage.set_trial_state_values(t, TrialState.COMPLETE, [1.0]) for t in (b, c)]) \
        == st.BUDGET_TAKEN

    other = st.open_study(StudySpec.from_dict({**spec.to_dict(), "name": "queued"}), st.open_storage())
    other.tell(other.ask(), 1.0)
    other._storage.create_new_trial(other._study_id)  # running ahead
    stopped = other._storage.create_new_trial(other._study_id)
    other._storage.set_trial_state_values(stopped, TrialState.FAIL)
    st.requeue(other, other._storage.get_trial(stopped))  # its retry waits for a worker
    new = other._storage.get_trial(other._storage.create_new_trial(other._study_id))
    runner.study = other
    assert st.Runner._budget_full(runner, new) == st.RETRY_FIRST


def test_two_workers_finish_a_tune_budget_exactly(workdir):
    """Without the rule above, two workers that reach the budget's last trial together both run one."""
    spec = write_spec(workdir / "t.yaml", "t2", kind="tune", grid={}, budget=3,
                      search={"optim.lr": {"low": 0.01, "high": 0.2, "log": True}}, sampler={"seed": 0},
                      pruner={"name": "none"})
    proc = subprocess.run(sweeper_cmd("study", "run", str(spec), "--workers", "2", "--quiet", "--no-report"),
                          cwd=workdir, env=subprocess_env(workdir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = optuna.load_study(study_name="t2", storage=f"sqlite:///{workdir / 'mlruns' / 'optuna.db'}")
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 3, [t.state for t in study.trials]
    assert {t.user_attrs.get(st.T_SKIPPED) for t in study.trials} <= {None, st.BUDGET_TAKEN}


def test_storages_workers_cannot_share_and_the_worker_environment(monkeypatch):
    with pytest.raises(SpecError, match="in-memory SQLite database, which other processes cannot open"):
        check_storage("sqlite://", 2)
    check_storage("sqlite://", 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = worker_env(2, workers=2, gpus=4)
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2)) and env["CUDA_VISIBLE_DEVICES"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_env(0, workers=2, gpus=1)["OMP_NUM_THREADS"] == "3" and "CUDA_VISIBLE_DEVICES" not in worker_env(
        0, workers=2, gpus=1)


def _busy_workers(db) -> set[int]:
    """Worker pids whose RUNNING trial has reported at least one epoch."""
    try:
        with sqlite3.connect(db, timeout=5) as con:
            rows = con.execute(
                "select a.value_json from trials t join trial_user_attributes a on a.trial_id = t.trial_id "
                "and a.key = ? where t.state = 'RUNNING' and exists (select 1 from trial_intermediate_values v "
                "where v.trial_id = t.trial_id)", (st.T_WORKER,)).fetchall()
    except sqlite3.Error:
        return set()
    return {json.loads(value)["pid"] for (value,) in rows}


def test_workers_share_a_study_and_ctrl_c_stops_them_all(workdir, mlflow_server, monkeypatch):
    # 5 epochs: after the first report a trial has 4 left, so both are still running when Ctrl-C lands.
    # With 3 this test failed once in a full run on a busy host (cause not captured); a trial finishing
    # between the check below and the signal is the likeliest race, and this narrows it.
    base = {**TINY_BASE, "epochs": 5, "data": {**TINY_BASE["data"], "synthetic": {
        **TINY_BASE["data"]["synthetic"], "train_size": 600}}}
    spec = write_spec(workdir / "w.yaml", "w", base=base, grid={"optim.lr": [0.01, 0.02, 0.05, 0.1, 0.2, 0.3]})
    proc = subprocess.Popen(sweeper_cmd("study", "run", str(spec), "--workers", "2", "--quiet", "--tracking-uri",
                                        mlflow_server.uri),
                            cwd=workdir, env=subprocess_env(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    db = workdir / "mlruns" / "optuna.db"
    deadline = time.monotonic() + 180
    while len(_busy_workers(db)) < 2:  # both workers inside a trial
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the two workers never trained at the same time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal does
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, out
    assert f"Resume with: sweeper study run {spec} --workers 2" in out
    assert "[w1] interrupted;" in out and "[w2] interrupted;" in out

    study = optuna.load_study(study_name="w", storage=f"sqlite:///{db}")
    workers = {t.user_attrs[st.T_WORKER]["pid"] for t in study.trials if st.T_WORKER in t.user_attrs}
    assert len(workers) == 2
    for pid in workers:  # the workers are gone, not left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(waiting) == 2  # both interrupted trials are queued again, as retries
    client = MlflowClient(mlflow_server.uri)
    parent_id = study.user_attrs[st.A_PARENT]
    assert client.get_run(parent_id).info.status == "KILLED"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    lines: list[str] = []
    resumed = st.run(load_spec(str(spec)), quiet=True, echo=lines.append)
    assert sum("retry of trial" in line for line in lines) == 2
    complete = [t for t in resumed.study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.system_attrs["grid_id"] for t in complete) == [0, 1, 2, 3, 4, 5]
    runs = child_runs(client, "w", parent_id)
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(int(r.data.tags["optuna.origin_trial"]) for r in runs) == sorted(st.origin(t) for t in complete)
    assert resumed.parent_run_id == parent_id and client.get_run(parent_id).info.status == "FINISHED"
    assert resumed.report == st.state_dir() / "reports" / "w" / "report.md" and resumed.report.exists()
    assert "report/report.md" in {a.path for a in client.list_artifacts(parent_id, "report")}


def test_ctrl_c_between_two_trials_leaves_no_trial_running(workdir, mlflow_server, monkeypatch):
    """Ctrl-C while Optuna creates the next trial (between two trials): the trial is failed and queued
    again, not left RUNNING with no worker behind it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    real_ask = optuna.study.Study.ask

    def ask(self, *args, **kw):
        trial = real_ask(self, *args, **kw)
        if trial.number == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs now, inside ask
        return trial

    monkeypatch.setattr(optuna.study.Study, "ask", ask)
    spec = write_spec(workdir / "b.yaml", "between", grid={"optim.lr": [0.05, 0.1, 0.2]})
    with pytest.raises(st.Interrupted, match="Resume with: sweeper study resume between"):
        st.run(load_spec(str(spec)), quiet=True, echo=lambda line: None)
    study = optuna.load_study(study_name="between", storage=st.storage_url())
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert study.trials[2].system_attrs[st.S_ORIGIN] == 1
