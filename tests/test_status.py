"""`study status` / `study list`: the fast reader of a study (no Optuna import) against Optuna's own API,
STALE trials (a dead local worker at once, a remote one by its heartbeat), elapsed time and ETA, --json,
--watch. No training: trials are made with Optuna's ask/tell."""
from __future__ import annotations

import datetime
import importlib
import json
import sqlite3
import subprocess
import sys
import warnings

import pytest
from click.testing import CliRunner
from conftest import TINY_BASE, subprocess_env

from sweeper import study as st
from sweeper.cli import main
from sweeper.spec import StudySpec

pg = importlib.import_module("sweeper.study.progress")  # (sweeper.study.progress is also a function's name)

DB = "mlruns/optuna.db"


def grid_spec(name="s", points=4):
    return StudySpec.from_dict({"name": name, "kind": "grid", "base": TINY_BASE,
                                "grid": {"optim.lr": [0.01 * (i + 1) for i in range(points)],
                                         "optim": [{"name": "sgdm"}, {"name": "adamw", "lr": 0.001}]},
                                "overrides": ["base.epochs=2"]})


def ask(study, spec=None):
    """The next queued grid point (its params suggested, as a trial of a study run does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial = study.ask()
    if spec is not None:
        st.suggest(trial, spec)
    return trial


def make_study(workdir, name="s"):
    """A grid study of 8 points: 3 COMPLETE (one with curves and a result), 1 PRUNED, 1 FAIL, 2 RUNNING
    (a dead local worker; a remote worker whose heartbeat is 100 s old), 1 WAITING."""
    storage = st.open_storage()
    spec = grid_spec(name)
    study = st.open_study(spec, storage)
    for i, value in enumerate([50.0, 60.0, float("-inf")]):
        t = ask(study, spec)
        for step in (1, 2):
            t.report(value - 3 + step, step)
        t.set_user_attr(st.T_RESULT, {"status": "diverged" if i == 2 else "completed",
                                      "summary": {"final_eval_acc": value, "epochs": 2},
                                      "curves": {"eval_acc": [value - 2, value - 1]}})
        study.tell(t, value)
    import optuna

    t = ask(study, spec)
    t.report(1.0, 1)
    study.tell(t, state=optuna.trial.TrialState.PRUNED)
    study.tell(ask(study, spec), state=optuna.trial.TrialState.FAIL)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    local = ask(study, spec)
    local.set_user_attr(st.T_WORKER, {"host": st.worker_id()["host"], "pid": gone.pid, "start": None})
    local.report(5.0, 1)
    remote = ask(study, spec)
    remote.set_user_attr(st.T_WORKER, {"host": "elsewhere", "pid": 4242, "start": "1"})
    storage.record_heartbeat(st.trial_id(storage, study, remote.number))
    with sqlite3.connect(DB) as con:
        con.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-100 seconds')")
    return study, spec


def test_the_fast_reader_equals_optunas_api(workdir):
    study, spec = make_study(workdir)
    view, read_spec = pg.snapshot("s")
    assert view.heartbeats and read_spec.to_dict() == spec.to_dict() and read_spec.overrides == ["base.epochs=2"]
    theirs = study.get_trials(deepcopy=False)
    assert [t.number for t in view.trials] == [t.number for t in theirs]
    for a, b in zip(view.trials, theirs):
        assert a.state == b.state and a.state.name == b.state.name
        assert a.params == b.params and type(a.params["seed"]) is type(b.params["seed"])
        assert dict(a.user_attrs) == b.user_attrs and dict(a.system_attrs) == b.system_attrs
        assert a.value == b.value and a.intermediate_values == b.intermediate_values and a.last_step == b.last_step
        assert (a.datetime_start, a.datetime_complete, a.duration) == (b.datetime_start, b.datetime_complete,
                                                                       b.duration)
    assert dict(view.user_attrs) == study.user_attrs and view.direction == "maximize"
    assert pg.progress(view, spec) == pg.progress(study, spec)
    assert pg.names() == ["s"]
    ages = {t.number: t.heartbeat_age for t in view.trials if t.heartbeat_age is not None}
    assert list(ages) == [6] and 95 <= ages[6] <= 200  # the remote worker's heartbeat, 100 s old


def test_the_fast_reader_decodes_every_kind_of_parameter(workdir):
    spec = StudySpec.from_dict({"name": "t", "kind": "tune", "base": TINY_BASE, "budget": 3,
                                "search": {"optim.lr": {"low": 1e-3, "high": 1e-1, "log": True},
                                           "batch_size": {"low": 16, "high": 64},
                                           "optim.name": ["sgdm", "adamw"]}})
    study = st.open_study(spec, st.open_storage())
    for _ in range(2):
        t = ask(study, spec)
        study.tell(t, 1.0)
    view, _ = pg.snapshot("t")
    assert [t.params for t in view.trials] == [t.params for t in study.get_trials()]
    assert all(isinstance(t.params["batch_size"], int) for t in view.trials)


def test_status_shows_stale_trials_elapsed_eta_and_the_overrides(workdir, monkeypatch):
    monkeypatch.setenv("SWEEPER_HEARTBEAT_GRACE", "30")
    make_study(workdir)
    result = CliRunner().invoke(main, ["study", "status", "s"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "study s (grid): 4/8 done" in out  # the PRUNED trial finished its point
    assert "COMPLETE 3" in out and "PRUNED 1" in out and "FAIL 1" in out and "STALE 2" in out
    assert "RUNNING" not in out.split("\n")[1]
    assert "(1 diverged)" in out and "set: --set base.epochs=2" in out
    assert "best eval_acc: 60" in out and "time: elapsed" in out and "ETA" in out
    lines = [line for line in out.splitlines() if line.startswith("stale: ")]
    assert len(lines) == 2
    assert "its worker is gone" in lines[0] and f"worker {st.worker_id()['host']}:" in lines[0]
    assert "no heartbeat for" in lines[1] and "worker elsewhere:4242" in lines[1] and "stale 1" in lines[1]
    data = json.loads(CliRunner().invoke(main, ["study", "status", "s", "--json"]).output)
    assert data["counts"]["STALE"] == 2 and data["stale"] == [5, 6] and data["running"] == [[5, 1], [6, 0]]
    assert data["overrides"] == ["base.epochs=2"] and data["eta_s"] is not None and data["elapsed_s"] >= 0
    assert data["trials_running"][1]["worker"] == "elsewhere:4242" and data["heartbeat_grace_s"] == 30
    listed = CliRunner().invoke(main, ["study", "list"]).output
    assert listed.startswith("s ") and "4/8" in listed and "running 2" in listed


def test_eta_from_finished_trials_and_what_runs(workdir):
    """4 points left of 8 at 10 s a trial, one of them running for 4 s in a live worker: 6 + 3 x 10 s."""
    t0 = datetime.datetime(2030, 1, 1)

    def rec(n, state, start, end=None, worker=None):
        attrs = {st.T_WORKER: worker} if worker else {}
        return pg.TrialRecord(n, state, {"optim.lr": 0.01, "optim": '{"name":"sgdm"}', "seed": 0}, attrs, {},
                              1.0 if end else None, {}, t0 + datetime.timedelta(seconds=start),
                              t0 + datetime.timedelta(seconds=end) if end is not None else None)
    me = st.worker_id()
    trials = [rec(0, pg.State.COMPLETE, 0, 10), rec(1, pg.State.COMPLETE, 10, 20), rec(2, pg.State.COMPLETE, 20, 30),
              rec(3, pg.State.COMPLETE, 30, 40), rec(4, pg.State.RUNNING, 40, worker=me)]
    for t in trials[:4]:
        t.user_attrs[st.T_POINT] = t.number
    s = pg.status(pg.StudyView("s", {}, trials), grid_spec(), now=t0 + datetime.timedelta(seconds=44))
    assert s.mean_trial == 10 and s.elapsed == 44 and s.eta == pytest.approx(6 + 3 * 10)
    assert [r.stale for r in s.running] == [None] and s.counts == {"COMPLETE": 4, "RUNNING": 1}


def test_watch_refreshes_until_ctrl_c_and_stops_when_complete(workdir, monkeypatch):
    make_study(workdir)
    calls = []

    def sleep(seconds):
        calls.append(seconds)
        if len(calls) % 2 == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr("sweeper.study_cli._wait", sleep)
    result = CliRunner().invoke(main, ["study", "status", "s", "--watch", "1"])
    assert result.exit_code == 0 and calls == [1.0, 1.0]
    assert result.output.count("study s (grid)") == 2  # plain repeated blocks off a terminal
    result = CliRunner().invoke(main, ["study", "status", "s", "--watch", "--json"])
    assert result.exit_code == 0 and len(result.output.strip().splitlines()) == 2  # JSON lines, default 5 s
    assert calls[-1] == 5.0


def test_a_complete_study_is_shown_once_by_watch(workdir):
    storage = st.open_storage()
    spec = grid_spec("c", points=1)
    study = st.open_study(spec, storage)
    for _ in range(2):
        t = ask(study, spec)
        t.set_user_attr(st.T_RESULT, {"status": "completed", "summary": {}, "curves": {}})
        study.tell(t, 1.0)
    result = CliRunner().invoke(main, ["study", "status", "c", "--watch", "0.5"])
    assert result.exit_code == 0 and result.output.count("study c (grid)") == 1 and "complete" in result.output


@pytest.mark.slow
def test_status_and_list_import_neither_optuna_nor_sqlalchemy(workdir):
    make_study(workdir)
    script = ("import sys\nfrom click.testing import CliRunner\nfrom sweeper.cli import main\n"
              "for args in (['study', 'list'], ['study', 'status', 's'], ['study', 'status', 's', '--json']):\n"
              "    r = CliRunner().invoke(main, args)\n    assert r.exit_code == 0, r.output\n"
              "print(sorted(m for m in ('optuna', 'sqlalchemy', 'torch', 'mlflow', 'pandas') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=workdir, timeout=120,
                         env=subprocess_env(workdir))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_an_unknown_study_lists_the_known_ones(workdir):
    make_study(workdir)
    result = CliRunner().invoke(main, ["study", "status", "nope"])
    assert result.exit_code == 2 and "no study named 'nope'" in result.output and "known: s" in result.output


def test_the_study_eta_beside_a_trial_counts_that_trial_once():
    """Seen from inside a trial (the status read before it started): the trials not started yet at the
    finished ones' mean, plus what this and the other live trials have left, shared by the live workers."""
    from sweeper.study.progress import Progress, Running, Status, study_eta

    def status(running):
        return Status("s", None, Progress({}, done=2, total=4, best=None), {}, running, None, None, 20.0, 30.0, [])

    assert study_eta(status([]), 28.0, 40.0) == pytest.approx(20.0 + 28.0)  # one trial after this one
    other = Running(number=3, epoch=1, elapsed=5.0, worker="h:1", heartbeat_age=1.0)
    assert study_eta(status([other]), 28.0, 40.0) == pytest.approx((28.0 + 15.0) / 2)  # two workers, none left
    assert study_eta(status([]), None, None) is None  # before this trial's first epoch
