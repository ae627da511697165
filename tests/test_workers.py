"""`study run --workers N` on the default SQLite storage: N processes share one study, Ctrl-C stops them
all and says how to resume, the resume completes every grid point once; and the two mechanisms that keep
concurrent workers honest: the compare-and-set that elects the worker which ends the study, and the rule
that two workers picking one grid point at once leave it to the lower trial number."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import optuna
import pytest
from conftest import TINY_BASE, busy_workers, child_runs, pop_race, subprocess_env, sweeper_cmd, write_spec
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweeper import study as st
from sweeper.spec import StudySpec, SpecError, load_spec
from sweeper.study.trial import Trials
from sweeper.workers import check_storage, worker_env


def test_a_grid_point_queued_twice_runs_once(workdir):
    """Two starts that queue a failed point's retry at the same instant leave it queued twice: the higher
    trial finds the point taken (running or done) and is skipped without training."""
    spec = StudySpec.from_dict({"name": "twice", "kind": "grid", "base": TINY_BASE,
                                "grid": {"optim.lr": [0.05, 0.1]}, "seeds": [0]})
    storage = st.open_storage()
    study = st.open_study(spec, storage)
    assert [t.user_attrs[st.T_POINT] for t in study.trials] == [0, 1]
    first = study.ask()  # point 0
    study.tell(first, state=TrialState.FAIL)
    assert st.top_up(study, spec) == [0] and st.top_up(study, spec) == []  # queued once per look...
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=study.trials[2].params,  # ...but a
                                        distributions=study.trials[2].distributions,  # concurrent look queues it too
                                        user_attrs={st.T_POINT: 0}))
    trials = Trials(study, storage, spec, client=None, parent=None)
    a = study.ask()
    assert a.number == 1  # (spec order: point 1 was queued first)
    b, c = study.ask(), study.ask()
    assert (b.number, c.number) == (2, 3)
    frozen = lambda t: storage.get_trial(st.trial_id(storage, study, t.number))  # noqa: E731
    assert trials._skip_reason(frozen(b)) is None
    assert trials._skip_reason(frozen(c)) == st.POINT_TAKEN


def test_a_tune_budget_is_not_overshot_by_concurrent_workers(workdir):
    """Budget 3, 1 trial finished, trials a < b < c running in three workers: a and b run; c would be one
    too many if they finish, so it waits, and runs if one of them fails, or is skipped (its worker stops)
    once they finish."""
    spec = StudySpec.from_dict({"name": "budget", "kind": "tune", "base": TINY_BASE, "budget": 3,
                                "search": {"optim.lr": {"low": 0.01, "high": 0.2, "log": True}}})
    storage = st.open_storage()
    study = st.open_study(spec, storage)
    study.tell(study.ask(), 1.0)
    a, b, c = (study.ask() for _ in range(3))
    trials = Trials(study, storage, spec, client=None, parent=None)
    looks = []
    real = study.get_trials

    def counted(*args, **kw):
        looks.append(1)
        return real(*args, **kw)

    study.get_trials = counted

    def full(trial, then=None):  # `then` happens while the trial waits (after its first look)
        looks.clear()
        if then is not None:
            def act():
                while not looks:
                    time.sleep(0.01)
                then()
            threading.Thread(target=act).start()
        return trials.budget_full(storage.get_trial(st.trial_id(storage, study, trial.number)), poll=0.05)

    assert full(a) is None and full(b) is None
    assert full(c, then=lambda: study.tell(a, state=TrialState.FAIL)) is None and len(looks) > 1
    d = study.ask()
    assert full(d, then=lambda: [study.tell(t, 1.0) for t in (b, c)]) == st.BUDGET_TAKEN


@pytest.mark.slow
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


@pytest.mark.slow
def test_workers_share_a_study_and_ctrl_c_stops_them_all(workdir, mlflow_server, monkeypatch):
    # 5 epochs: after the first report a trial has 4 left, so both are still running when Ctrl-C lands
    # (a trial finishing between the check below and the signal would leave a worker between trials).
    base = {**TINY_BASE, "epochs": 5, "data": {**TINY_BASE["data"], "synthetic": {
        **TINY_BASE["data"]["synthetic"], "train_size": 600}}}
    spec = write_spec(workdir / "w.yaml", "w", base=base, grid={"optim.lr": [0.01, 0.02, 0.05, 0.1, 0.2, 0.3]})
    proc = subprocess.Popen(sweeper_cmd("study", "run", str(spec), "--workers", "2", "--quiet", "--tracking-uri",
                                        mlflow_server.uri),
                            cwd=workdir, env=subprocess_env(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    db = workdir / "mlruns" / "optuna.db"
    deadline = time.monotonic() + 180
    while len(busy_workers(db)) < 2:  # both workers inside a trial
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
    retries = [t for t in study.trials if t.state == TrialState.WAITING and st.S_ORIGIN in t.system_attrs]
    assert len(retries) == 2  # both interrupted trials are queued again, as retries
    client = MlflowClient(mlflow_server.uri)
    parent_id = study.user_attrs[st.A_PARENT]
    assert client.get_run(parent_id).info.status == "KILLED"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    lines: list[str] = []
    resumed = st.run(load_spec(str(spec)), quiet=True, echo=lines.append)
    assert sum("retry of trial" in line for line in lines) == 2
    complete = [t for t in resumed.study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs[st.T_POINT] for t in complete) == [0, 1, 2, 3, 4, 5]
    runs = child_runs(client, "w", parent_id)
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(int(r.data.tags["optuna.origin_trial"]) for r in runs) == sorted(st.origin(t) for t in complete)
    assert resumed.parent_run_id == parent_id and client.get_run(parent_id).info.status == "FINISHED"
    assert resumed.report == st.state_dir() / "reports" / "w" / "report.md" and resumed.report.exists()
    assert "report/report.md" in {a.path for a in client.list_artifacts(parent_id, "report")}


@pytest.mark.slow
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
    # point 2 still queued; point 1's trial failed and queued again as its retry
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL] + [TrialState.WAITING] * 2
    assert study.trials[3].system_attrs[st.S_ORIGIN] == 1


def test_each_queued_point_is_popped_once_on_sqlite(workdir):
    """The grid queue's contract on SQLite (BEGIN IMMEDIATE makes Optuna's pop atomic, see
    `storage._serialize_sqlite`): six threads asking at once take each queued point exactly once."""
    assert pop_race(st.open_storage(), threads=6, points=18) == list(range(18))


def test_the_board_keeps_a_live_row_per_worker_and_prints_the_rest_above():
    """In a terminal: a worker's epoch lines replace its row (its trial, the epoch, the study's ETA); its
    other lines (trial headers and results) scroll above the rows."""
    import io

    from rich.console import Console

    from sweeper.workers import Board

    screen = io.StringIO()
    echoed: list[str] = []
    board = Board(2, echoed.append, live=True, console=Console(file=screen, force_terminal=True, width=200))
    board.line(1, "trial 3 [4/8] optim.lr=0.1 seed=0")
    board.line(1, "epoch   1/5  train loss 0.5 ... 8,000 img/s  ETA 40 s  (study s: 3/8 done, ETA 5 min 00 s)")
    board.line(2, "trial 4 [5/8] optim.lr=0.2 seed=0")
    assert board.rows[1] == "[w1] trial 3 epoch   1/5  train loss 0.5 ... 8,000 img/s  ETA 40 s  (study s: 3/8 done, ETA 5 min 00 s)"
    assert board.rows[2] == "[w2] starting"  # no epoch yet
    board.close()
    assert echoed == [] and "[w1] trial 3 [4/8]" in screen.getvalue() and "[w2] trial 4 [5/8]" in screen.getvalue()
    piped: list[str] = []
    plain = Board(2, piped.append, live=False)
    plain.line(2, "epoch   1/5  ...")
    assert piped == ["[w2] epoch   1/5  ..."]


@pytest.mark.slow
def test_workers_relay_every_epoch_line_unless_quiet_and_print_one_summary(workdir):
    spec = write_spec(workdir / "e.yaml", "e", grid={"optim.lr": [0.05, 0.1, 0.2]})
    proc = subprocess.run(sweeper_cmd("study", "run", str(spec), "--workers", "2", "--no-report"),
                          cwd=workdir, env=subprocess_env(workdir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    epochs = [line for line in lines if line[:3] in ("[w1", "[w2") and line[5:].startswith("epoch ")]
    assert len(epochs) == 6 and all("(study e: " in line for line in epochs), proc.stdout
    assert sum(line.startswith("study e: 3/3 done") for line in lines) == 1, proc.stdout


@pytest.mark.slow
def test_preparing_a_study_for_workers_imports_no_torch(workdir):
    """`--workers N` prepares the study in its own process and trains nothing there: the trainer's import
    (torch, seconds) is the workers' alone. (On a machine with an NVIDIA driver, counting its GPUs does.)"""
    import sys
    from pathlib import Path

    spec = write_spec(workdir / "p.yaml", "prep")
    script = ("import sys; from sweeper.spec import load_spec; from sweeper.study import run; "
              "from sweeper.workers import _gpu_count; "
              "out = run(load_spec(sys.argv[1]), n_trials=0, quiet=True, echo=lambda line: None); _gpu_count(); "
              "print(out.progress.total, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", script, str(spec)], cwd=workdir, env=subprocess_env(workdir),
                         capture_output=True, text=True, timeout=120)
    driver = Path("/proc/driver/nvidia/gpus").exists()
    assert res.stdout.split()[-2:] == ["2", str(driver)], res.stdout + res.stderr
