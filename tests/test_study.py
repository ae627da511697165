"""Optuna side of studies: grid points exactly once, failures and divergence, retries of killed trials,
Ctrl-C, tuning with a budget, base_from, and a SIGKILL of a real `sweeper study run` process."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import time
import warnings
from collections import Counter

import optuna
import pytest
from conftest import (TINY_BASE, child_runs, first_epoch_logged, free_port, run_of, steps, subprocess_env,
                      sweeper_cmd, write_spec)
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweeper import study as st
from sweeper.spec import StudySpec, load_spec


@pytest.fixture
def tracked(workdir, mlflow_server, monkeypatch):
    """Studies in this test log to the shared real server (a fresh SQLite MLflow store costs seconds)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return workdir


def run(path, **kw):
    lines: list[str] = []
    out = st.run(load_spec(str(path)), quiet=True, echo=lines.append, **kw)
    return out, lines


def trials(out, state=None):
    return [t for t in out.study.get_trials(deepcopy=False) if state is None or t.state == state]


@pytest.mark.slow
def test_grid_runs_every_point_once_and_a_rerun_nothing(tracked):
    workdir = tracked
    spec = write_spec(workdir / "g.yaml", "g", grid={"optim.lr": [0.05, 0.1]}, seeds=[0, 1])
    out, lines = run(spec)
    done = trials(out, TrialState.COMPLETE)
    assert len(done) == 4 and out.ran == 4
    assert sorted(t.user_attrs[st.T_POINT] for t in done) == [0, 1, 2, 3]
    assert [(t.params["seed"], t.params["optim.lr"]) for t in done] == [(0, 0.05), (0, 0.1), (1, 0.05), (1, 0.1)]
    for t in done:  # what reports and resumes read
        assert st.status_of(t) == "completed"
        assert st.summary_of(t)["epochs"] == 2
        assert len(st.curves_of(t)["eval_acc"]) == 2
        assert t.value == st.summary_of(t)["final_eval_acc"]
        assert t.intermediate_values.keys() == {1, 2}
    assert sum(line.startswith("trial ") and " COMPLETE " in line for line in lines) == 4
    assert not (workdir / "mlruns" / "checkpoints" / "g").exists()  # delivered: checkpoints released
    again, lines = run(spec)
    assert again.ran == 0 and len(trials(again)) == 4
    assert any("is complete" in line for line in lines)


@pytest.mark.slow
def test_failed_points_rerun_once_per_call_and_divergence_is_an_outcome(tracked):
    workdir = tracked
    base = {**TINY_BASE, "divergence_loss": 50.0}
    # batch 4096 > the 256 training examples: that point fails (a crash); lr 1e4 diverges (an outcome).
    spec = write_spec(workdir / "f.yaml", "f", base=base, grid={"optim.lr": [0.05, 1.0e4], "batch_size": [32, 4096]})
    out, lines = run(spec)
    assert out.ran == 4  # each failing point was tried once, not again and again
    states = Counter(t.state for t in trials(out))
    assert states == {TrialState.COMPLETE: 2, TrialState.FAIL: 2}
    diverged = [t for t in trials(out, TrialState.COMPLETE) if st.status_of(t) == "diverged"]
    assert len(diverged) == 1 and diverged[0].value == -math.inf and diverged[0].params["optim.lr"] == 1.0e4
    assert out.progress.done == 2 and out.progress.diverged == 1 and out.progress.best[1] > 0
    failed = trials(out, TrialState.FAIL)
    assert all("batch_size" in t.user_attrs[st.T_ERROR] for t in failed)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # the diverged epoch's figures are recorded
    history = client.get_metric_history(run_of(client, "f", diverged[0].number).info.run_id, "train_loss")
    assert math.isnan(max(history, key=lambda m: m.step).value)
    assert any("FAIL: " in line and "batch_size" in line for line in lines)  # the reason, on the console
    # A second call reruns the failed points, each as a retry of its first trial, and stops again.
    again, _ = run(spec)
    assert again.ran == 2
    retries = [t for t in trials(again, TrialState.FAIL) if t.number >= 4]
    assert sorted(t.system_attrs[st.S_ORIGIN] for t in retries) == sorted(t.number for t in failed)
    assert len(trials(again, TrialState.COMPLETE)) == 2  # the diverged point is never rerun


@pytest.mark.slow
def test_stale_trials_are_failed_and_requeued_by_heartbeat(workdir, monkeypatch):
    monkeypatch.setenv("SWEEPER_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("SWEEPER_HEARTBEAT_GRACE", "1")
    storage = st.open_storage()
    study = optuna.create_study(study_name="hb", storage=storage)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr(st.T_WORKER, {"host": "another-machine", "pid": 1, "start": None})
    trial.set_user_attr(st.T_RUN, "abc")
    storage.record_heartbeat(st.trial_id(storage, study, trial.number))
    assert st.recover(study, storage) == []  # heartbeat fresh: alive as far as we can tell
    time.sleep(2.2)
    assert st.recover(study, storage) == [trial.number]
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    retry = study.trials[1]
    assert retry.system_attrs[st.S_ORIGIN] == trial.number and retry.params == {"x": trial.params["x"]}
    assert retry.user_attrs == {st.T_RUN: "abc"}  # the MLflow run travels; the dead worker does not


def test_trials_of_a_dead_local_process_are_retried_at_once(workdir):
    storage = st.open_storage()
    study = optuna.create_study(study_name="dead", storage=storage)
    proc = subprocess.Popen(["true"])
    proc.wait()
    trial = study.ask()
    trial.set_user_attr(st.T_WORKER, {"host": socket.gethostname(), "pid": proc.pid, "start": None})
    mine = study.ask()
    mine.set_user_attr(st.T_WORKER, st.worker_id())  # this process: alive
    assert st.recover(study, storage) == [trial.number]
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]


@pytest.mark.slow
def test_ctrl_c_requeues_the_trial_and_resume_continues_it(tracked, mlflow_server, monkeypatch):
    workdir = tracked
    import importlib

    train_module = importlib.import_module("trainers.train")  # the package exports a function of that name
    real_train = train_module.train
    calls = []

    def interrupted_train(cfg, on_epoch=None, **kw):
        calls.append(cfg.optim.lr)

        def hook(report):
            on_epoch(report)
            if len(calls) == 2 and report.epoch == 1:  # second trial, after its first epoch
                raise KeyboardInterrupt
        return real_train(cfg, on_epoch=hook, **kw)

    spec = write_spec(workdir / "c.yaml", "c", grid={"optim.lr": [0.05, 0.1, 0.2]})
    monkeypatch.setattr(train_module, "train", interrupted_train)
    with pytest.raises(st.Interrupted, match=r"1 trial\(s\) finished in this run. Resume with: sweeper study resume c"):
        run(spec)
    study = optuna.load_study(study_name="c", storage=st.storage_url())
    # point 2 still queued; point 1's trial failed and queued again as its retry
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL] + [TrialState.WAITING] * 2
    assert study.trials[3].system_attrs[st.S_ORIGIN] == 1 and study.trials[3].user_attrs[st.T_POINT] == 1
    client = MlflowClient(mlflow_server.uri)
    killed = run_of(client, "c", 1)
    assert killed.info.status == "KILLED" and steps(client, killed.info.run_id) == [1]
    assert (workdir / "mlruns" / "checkpoints" / "c" / "1" / "checkpoint.pt").exists()

    monkeypatch.setattr(train_module, "train", real_train)
    out, lines = run(spec)
    assert any("retry of trial 1, from epoch 1" in line for line in lines)
    done = trials(out, TrialState.COMPLETE)
    assert sorted(t.user_attrs[st.T_POINT] for t in done) == [0, 1, 2]
    (retry,) = [t for t in done if t.user_attrs[st.T_POINT] == 1]
    assert retry.system_attrs[st.S_ORIGIN] == 1 and run_of(client, "c", 1).info.run_id == killed.info.run_id
    runs = child_runs(client, "c", out.parent_run_id)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert all(steps(client, r.info.run_id) == [1, 2] for r in runs)


@pytest.mark.slow
def test_an_epoch_reported_before_its_checkpoint_landed_is_not_logged_twice(tracked, mlflow_server, monkeypatch):
    """train() reports an epoch while a thread still writes its checkpoint. A stop in that window leaves
    the epoch in MLflow but not on disk: the retry trains it again and must not log it a second time."""
    workdir = tracked
    import importlib

    train_module, checkpoints = importlib.import_module("trainers.train"), importlib.import_module("trainers.checkpoints")
    real_train, real_save = train_module.train, checkpoints.save_checkpoint
    calls = []

    def lost_write(path, payload):  # the second trial's checkpoint of epoch 1 never lands
        if not (len(calls) == 2 and len(payload["history"]) == 1):
            real_save(path, payload)

    def interrupted_train(cfg, on_epoch=None, **kw):
        calls.append(cfg.optim.lr)

        def hook(report):
            on_epoch(report)
            if len(calls) == 2 and report.epoch == 1:
                raise KeyboardInterrupt
        return real_train(cfg, on_epoch=hook, **kw)

    spec = write_spec(workdir / "lost.yaml", "lost", grid={"optim.lr": [0.05, 0.1]})
    monkeypatch.setattr(train_module, "train", interrupted_train)
    monkeypatch.setattr(checkpoints, "save_checkpoint", lost_write)
    with pytest.raises(st.Interrupted):
        run(spec)
    client = MlflowClient(mlflow_server.uri)
    assert steps(client, run_of(client, "lost", 1).info.run_id) == [1]
    assert not (workdir / "mlruns" / "checkpoints" / "lost" / "1" / "checkpoint.pt").exists()

    monkeypatch.setattr(train_module, "train", real_train)
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    with warnings.catch_warnings():  # Optuna warns when a step is reported twice: the retry holds epoch 1
        warnings.filterwarnings("error", message="The reported value is ignored")
        out, lines = run(spec)
    assert len(trials(out, TrialState.COMPLETE)) == 2
    assert all(sorted(t.intermediate_values) == [1, 2] for t in trials(out, TrialState.COMPLETE))
    (run_id,) = {run_of(client, "lost", 1).info.run_id}
    assert steps(client, run_id) == [1, 2] and steps(client, run_id, "train_loss") == [1, 2]


@pytest.mark.slow
def test_tune_stops_at_the_budget_of_finished_trials(tracked):
    workdir = tracked
    spec = write_spec(workdir / "t.yaml", "t", kind="tune", grid={}, budget=3,
                      search={"optim.lr": {"low": 0.01, "high": 0.2, "log": True},
                              "optim.momentum": {"choices": [0.0, 0.9]}},
                      sampler={"seed": 1, "n_startup_trials": 2},
                      pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    out, _ = run(spec, n_trials=2)
    assert out.ran == 2
    out, _ = run(spec)
    finished = [t for t in trials(out) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and out.progress.done == 3
    assert all(0.01 <= t.params["optim.lr"] <= 0.2 for t in finished)
    again, _ = run(spec)
    assert again.ran == 0


def test_base_from_takes_the_best_point_of_another_study(workdir):
    storage = st.open_storage()
    src = StudySpec.from_dict({"name": "src", "kind": "grid", "base": TINY_BASE,
                               "grid": {"optim": [{"name": "sgdm", "lr": 0.05}, {"name": "adamw", "lr": 0.003}]},
                               "seeds": [0, 1]})
    study = st.open_study(src, storage)
    for point, value in zip(src.points(), [50.0, 70.0, 60.0, 68.0]):  # adamw wins on the mean over seeds
        t = study.ask()
        st.suggest(t, src)
        study.tell(t, value)
    dst = StudySpec.from_dict({"name": "dst", "kind": "grid", "base": TINY_BASE, "seeds": [0, 1, 2],
                               "base_from": {"study": "src"}})
    st.open_study(dst, storage)
    assert dst.base_from.params == {"optim": {"name": "adamw", "lr": 0.003}}
    assert dst.config({"seed": 2}).optim.name == "adamw"
    _, stored = st.load("dst", storage)
    assert stored.base_from.params == dst.base_from.params  # resume does not re-resolve
    missing = StudySpec.from_dict({"name": "x", "kind": "grid", "base": TINY_BASE, "seeds": [0, 1],
                                   "base_from": {"study": "nope"}})
    with pytest.raises(st.SpecError, match="no study named 'nope'.*known: dst, src"):
        st.open_study(missing, storage)


@pytest.mark.slow
def test_sigkill_mid_trial_then_the_same_command_completes_the_study(workdir, mlflow_server, monkeypatch):
    """Kill -9 a real `sweeper study run` process after the first epoch of its second trial, run the same
    command again (in this process, to save a second start-up): one COMPLETE trial per grid point, one
    MLflow child run per trial, steps 1..E once each."""
    from click.testing import CliRunner

    from sweeper.cli import main

    base = {**TINY_BASE, "epochs": 3, "data": {**TINY_BASE["data"], "synthetic": {
        **TINY_BASE["data"]["synthetic"], "train_size": 600}}}
    spec = write_spec(workdir / "k.yaml", "k", base=base, grid={"optim.lr": [0.02, 0.05, 0.1]})
    args = ["study", "run", str(spec), "--tracking-uri", mlflow_server.uri, "--quiet"]
    heartbeat = {"SWEEPER_HEARTBEAT_INTERVAL": "1", "SWEEPER_HEARTBEAT_GRACE": "2"}
    db = workdir / "mlruns" / "optuna.db"
    proc = subprocess.Popen(sweeper_cmd(*args), cwd=workdir, env=subprocess_env(workdir, **heartbeat),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not first_epoch_logged(db, 1):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the study never reached trial 1"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    first = proc.stdout.read().decode()
    for key, value in heartbeat.items():
        monkeypatch.setenv(key, value)
    rerun = CliRunner().invoke(main, args)
    assert rerun.exit_code == 0, first + rerun.output
    assert "retry of trial 1" in rerun.output

    study = optuna.load_study(study_name="k", storage=f"sqlite:///{db}")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs[st.T_POINT] for t in complete) == [0, 1, 2]  # each point exactly once
    assert study.trials[1].state == TrialState.FAIL
    client = MlflowClient(mlflow_server.uri)
    runs = child_runs(client, "k", study.user_attrs[st.A_PARENT])
    assert len(runs) == 3
    by_origin = {int(r.data.tags["optuna.origin_trial"]): r for r in runs}
    assert sorted(by_origin) == sorted(st.origin(t) for t in complete)
    for t in complete:
        r = by_origin[st.origin(t)]
        assert r.info.status == "FINISHED" and r.data.tags["optuna.state"] == "COMPLETE"
        for key in ("eval_acc", "train_loss", "epoch_time"):
            assert steps(client, r.info.run_id, key) == [1, 2, 3], (key, r.info.run_name)
    assert not os.path.exists(workdir / "mlruns" / "checkpoints" / "k")


@pytest.mark.slow
def test_cli_errors_are_one_friendly_line(workdir, tracked, mlflow_server):
    from click.testing import CliRunner

    from sweeper.cli import main

    cli = CliRunner()
    spec = write_spec(workdir / "e.yaml", "e", grid={"optim.lr": [0.1, -1.0]})
    result = cli.invoke(main, ["study", "run", str(spec)])
    assert result.exit_code == 2 and "error: " in result.output and "grid.optim.lr[1] = -1" in result.output
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    good = write_spec(workdir / "ok.yaml", "ok")
    result = cli.invoke(main, ["study", "run", str(good), "--tracking-uri", dead])
    assert result.exit_code == 2 and "is unreachable" in result.output and "Is the server running?" in result.output
    assert "ok" not in st.study_names(st.open_storage())  # nothing was created
    result = cli.invoke(main, ["study", "run", str(good), "--n-trials", "0"])  # create it, run nothing
    assert result.exit_code == 0 and "study ok is ready: 2 trial(s) to run" in result.output, result.output
    result = cli.invoke(main, ["worker", "ok", "-q"])  # what each machine of a multi-worker setup runs
    assert result.exit_code == 0, result.output
    assert "study ok: 2/2 done" in result.output and "orchestration" in result.output
    result = cli.invoke(main, ["study", "status", "nope"])
    assert result.exit_code == 2 and "no study named 'nope'" in result.output and "known: ok" in result.output
    result = cli.invoke(main, ["study", "status", "ok"])
    assert "2/2 done (100%)" in result.output and "COMPLETE 2" in result.output
    result = cli.invoke(main, ["study", "list"])
    assert result.output.startswith("ok ") and "2/2" in result.output
    result = cli.invoke(main, ["study", "resume", "ok", "-q"])
    assert result.exit_code == 0 and "is complete; nothing to run" in result.output
    # Every trial failing is not a success: the reason on the console, exit status 1.
    bad = write_spec(workdir / "bad.yaml", "bad", base={**TINY_BASE, "batch_size": 4096})
    result = cli.invoke(main, ["study", "run", str(bad), "-q"])
    assert result.exit_code == 1, result.output
    assert "FAIL: ConfigError: batch_size" in result.output or "FAIL: " in result.output and "4096" in result.output
    assert "study bad is not complete (0/2 done): 2 trial(s) failed in this run" in result.output


@pytest.mark.slow
def test_delete_removes_the_study_its_experiment_and_files_after_asking(workdir):
    from click.testing import CliRunner

    from sweeper.cli import main

    cli = CliRunner()
    spec = write_spec(workdir / "d.yaml", "gone")
    assert cli.invoke(main, ["study", "run", str(spec), "--n-trials", "1", "-q"]).exit_code == 0
    uri = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.get_experiment_by_name("gone").experiment_id
    refused = cli.invoke(main, ["study", "delete", "gone"], input="n\n")
    assert refused.exit_code == 1 and "Delete study gone (2 trials)" in refused.output
    assert "gone" in st.study_names(st.open_storage())  # nothing happened
    done = cli.invoke(main, ["study", "delete", "gone"], input="y\n")
    assert done.exit_code == 0 and "deleted study gone" in done.output, done.output
    assert "gone" not in st.study_names(st.open_storage())
    assert client.get_experiment_by_name("gone") is None and client.get_experiment(old).lifecycle_stage == "deleted"
    assert not (workdir / "mlruns" / "checkpoints" / "gone").exists()
    again = cli.invoke(main, ["study", "run", str(spec), "--n-trials", "0"])  # a new study of that name
    assert again.exit_code == 0 and client.get_experiment_by_name("gone").experiment_id != old
    assert cli.invoke(main, ["study", "delete", "nope", "--yes"]).exit_code == 2


@pytest.mark.slow
def test_a_rerun_of_a_complete_study_touches_neither_mlflow_nor_the_trainer(tracked):
    """Nothing left to run or deliver: the rerun answers from Optuna's storage alone (no courier, no
    torch import), and exits 0."""
    import sys

    spec = write_spec(tracked / "done.yaml", "done")
    out, _ = run(spec)
    assert out.complete
    script = ("import sys; from click.testing import CliRunner; from sweeper.cli import main; "
              f"r = CliRunner().invoke(main, ['study', 'run', {str(spec)!r}]); "
              "print(r.exit_code, 'is complete; nothing to run' in r.output, 'torch' in sys.modules, "
              "'mlflow' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", script], cwd=tracked, env=subprocess_env(tracked),
                         capture_output=True, text=True, timeout=120)
    assert res.stdout.split()[-4:] == ["0", "True", "False", "False"], res.stdout + res.stderr
