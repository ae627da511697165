"""MLflow side of studies, against a real tracking server on loopback: the parent/child structure, metric
histories, artifacts, reports on the parent run, and no metric lost while the server is down."""
from __future__ import annotations

import json
import threading
import time

import pytest
from click.testing import CliRunner
from conftest import TINY_BASE, child_runs, first_epoch_logged, run_of, steps, write_spec
from mlflow.tracking import MlflowClient

from sweeper import study as st
from sweeper import tracking
from sweeper.cli import main
from sweeper.spec import load_spec

EPOCH_KEYS = ("train_loss", "train_acc", "eval_loss", "eval_acc", "lr", "epoch_time")

pytestmark = pytest.mark.slow


def test_grid_study_on_a_real_server(workdir, mlflow_server):
    spec = write_spec(workdir / "srv.yaml", "srv-grid", grid={"optim": [{"name": "sgdm", "lr": 0.05},
                                                                       {"name": "adamw", "lr": 0.003}]})
    out = st.run(load_spec(str(spec)), tracking_uri=mlflow_server.uri, quiet=True, echo=lambda line: None)
    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweeper.kind"] == "study"
    assert parent.data.params["kind"] == "grid" and "grid.optim" in parent.data.params  # (the base: spec.yaml)
    assert "spec.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert client.get_experiment(parent.info.experiment_id).name == "srv-grid"
    runs = child_runs(client, "srv-grid", out.parent_run_id)
    assert len(runs) == 2
    for trial in out.study.trials:
        run = run_of(client, "srv-grid", trial.number)
        tags, params = run.data.tags, run.data.params
        assert tags["mlflow.parentRunId"] == out.parent_run_id
        assert tags["optuna.trial_number"] == str(trial.number) and tags["optuna.state"] == "COMPLETE"
        assert tags["sweeper.status"] == "completed" and run.info.status == "FINISHED"
        assert params["optim.name"] == json.loads(trial.params["optim"])["name"]  # the whole flattened config
        assert params["data.synthetic.train_size"] == "320" and params["seed"] == "0"
        for key in EPOCH_KEYS:
            assert steps(client, run.info.run_id, key) == [1, 2], key
        assert run.data.metrics["final/final_eval_acc"] == pytest.approx(trial.value)
        assert {"config.yaml", "curves.png", "result.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    # The report goes to the parent run too.
    result = CliRunner().invoke(main, ["study", "report", "srv-grid", "--out", str(workdir / "rep"),
                                       "--tracking-uri", mlflow_server.uri])
    assert result.exit_code == 0, result.output
    assert (workdir / "rep" / "report.md").exists() and (workdir / "rep" / "curves.png").exists()
    logged = {a.path for a in client.list_artifacts(out.parent_run_id, "report")}
    assert {"report/report.md", "report/summary.md", "report/curves.png"} <= logged


def test_undeliverable_items_are_spooled_and_replayed_once(workdir, mlflow_server, monkeypatch):
    client = tracking.connect(mlflow_server.uri)
    real = tracking.deliver

    def down(*args, **kw):
        raise ConnectionError("server down")

    monkeypatch.setattr(tracking, "deliver", down)
    logger = tracking.RunLogger(client, spool_dir=workdir / "spool", create={
        "experiment": "spool-test", "run_name": "r", "parent_run_id": None, "key": "spool-test/x/0", "tags": {}})
    for epoch in (1, 2, 3):
        logger.log_metrics({"eval_acc": 10.0 * epoch}, step=epoch)  # returns at once: training never waits
    assert logger.close(timeout=0.5) is False and logger.failures >= 1
    assert len(list((workdir / "spool").glob("*.jsonl"))) == 1
    monkeypatch.setattr(tracking, "deliver", real)
    assert tracking.replay_spool(client, workdir / "spool") == 1
    assert tracking.replay_spool(client, workdir / "spool") == 0  # the file is gone once delivered
    (run,) = client.search_runs([client.get_experiment_by_name("spool-test").experiment_id])
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, "eval_acc"),
                                              key=lambda m: m.step)] == [(1, 10.0), (2, 20.0), (3, 30.0)]
    # Backfill logs only the steps a run lacks.
    logger = tracking.RunLogger(client, run.info.run_id)
    logger.backfill([(s, {"eval_acc": 10.0 * s}) for s in (1, 2, 3, 4)], key="eval_acc")
    assert logger.close(status=None, timeout=30)
    assert steps(client, run.info.run_id) == [1, 2, 3, 4]


def test_no_metric_is_lost_while_the_server_is_down(workdir, mlflow_server, monkeypatch, capfd):
    """Stop the server during the first trial and start it again (same port and store) while later trials
    train: training never waits, and every epoch of every trial is in MLflow at the end, once."""
    base = {**TINY_BASE, "epochs": 3, "data": {**TINY_BASE["data"], "synthetic": {
        **TINY_BASE["data"]["synthetic"], "train_size": 500}}}
    spec = write_spec(workdir / "o.yaml", "outage", base=base, grid={"optim.lr": [0.02, 0.05, 0.1]})
    monkeypatch.setenv("SWEEPER_FLUSH_TIMEOUT", "180")  # the end of the study waits for the server
    db = workdir / "mlruns" / "optuna.db"
    trained_while_down = threading.Event()
    failures: list[BaseException] = []

    def outage() -> None:  # the study runs in the main thread meanwhile
        try:
            deadline = time.monotonic() + 180
            while not first_epoch_logged(db, 0):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            mlflow_server.stop()
            while not first_epoch_logged(db, 1):  # a whole epoch of the next trial without a server
                assert time.monotonic() < deadline
                time.sleep(0.05)
            trained_while_down.set()
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            failures.append(err)
        finally:
            mlflow_server.start()

    controller = threading.Thread(target=outage)
    controller.start()
    out = st.run(load_spec(str(spec)), tracking_uri=mlflow_server.uri, quiet=True, echo=lambda line: None)
    controller.join()
    assert not failures and trained_while_down.is_set()
    assert "will retry" in capfd.readouterr().err  # the outage did hit the loggers (in the courier process)

    client = MlflowClient(mlflow_server.uri)
    runs = child_runs(client, "outage", out.parent_run_id)
    assert len(runs) == 3
    for run in runs:
        assert run.info.status == "FINISHED", run.info.run_name
        for key in EPOCH_KEYS:
            assert steps(client, run.info.run_id, key) == [1, 2, 3], (run.info.run_name, key)
    spool = workdir / "mlruns" / "spool"
    assert not spool.exists() or not list(spool.glob("*.jsonl"))  # delivered live, nothing left over
    # Every trial's run is recorded in Optuna, those opened only after their trial finished (the outage)
    # in the study's attributes: a retry or a report finds the run without searching MLflow.
    recorded = {t.number: t.user_attrs.get(st.T_RUN) or out.study.user_attrs.get(f"sweeper.run.{t.number}")
                for t in out.study.trials}
    assert sorted(recorded.values()) == sorted(r.info.run_id for r in runs)


def test_a_delivery_that_outlasts_wait_is_spooled_and_the_thread_ends_cleanly(tmp_path, monkeypatch):
    """`wait` gives up on a delivery in flight and spools it; when that delivery then returns, the thread
    ends without an error (it used to pop from the emptied pending list: IndexError in the thread)."""
    import threading
    import time

    from sweeper import tracking

    release = threading.Event()

    class SlowClient:
        tracking_uri = "http://127.0.0.1:9"

        def log_batch(self, *args, **kwargs):
            release.wait(10)

    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    monkeypatch.setattr(tracking.RunLogger, "IN_FLIGHT_S", 0.2)
    logger = tracking.RunLogger(SlowClient(), run_id="r1", spool_dir=tmp_path / "spool")
    logger.log_metrics({"acc": 1.0}, step=1)
    logger.end(None)
    time.sleep(0.2)  # the thread is inside log_batch
    assert logger.wait(0.1) is False and logger.spooled
    release.set()
    logger._thread.join(10)
    assert not logger._thread.is_alive() and errors == []
    assert len(list((tmp_path / "spool").glob("*.jsonl"))) == 1
