"""What a study's MLflow runs carry besides metrics, read back through MlflowClient: the trials' real
start and end times, dataset inputs, environment tags, system metrics, the experiment's description and
UI tags, and a model that loads back and predicts what the trial's final evaluation measured."""
from __future__ import annotations

import json

import pytest
from conftest import TINY_BASE, write_spec

from sweeper import study as st
from sweeper.mlflow_ui import KIND_TAG, MODEL_TRAINING, SHARED_VIEW_PREFIX, VIEW_KEY, experiment_url
from sweeper.spec import load_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    import os

    from sweeper import run as run_module

    root = tmp_path_factory.mktemp("records")
    old, cwd = run_module.SYSTEM_METRICS_INTERVAL, os.getcwd()
    run_module.SYSTEM_METRICS_INTERVAL = 0.1
    os.chdir(root)
    env = pytest.MonkeyPatch()
    for name in ("MLFLOW_TRACKING_URI", "SWEEPER_STORAGE", "SWEEPER_STATE_DIR"):  # as the workdir fixture
        env.delenv(name, raising=False)
    uri = f"sqlite:///{root}/mlruns/mlflow.db"  # absolute: MLflow caches its stores by URI
    try:
        base = {**TINY_BASE, "epochs": 3, "data": {**TINY_BASE["data"], "synthetic": {
            **TINY_BASE["data"]["synthetic"], "train_size": 1600}}}
        spec = write_spec(root / "rec.yaml", "rec", base=base, description="Records of a tiny grid.",
                          grid={"optim": [{"name": "sgdm", "lr": 0.05}, {"name": "adamw", "lr": 0.003}]})
        out = st.run(load_spec(str(spec)), tracking_uri=uri, quiet=True,
                     echo=lambda line: None)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("rec")
        trials = client.search_runs([exp.experiment_id], "tags.`sweeper.kind` = 'trial'", order_by=["attributes.start_time"])
        yield out, client, exp, trials
    finally:
        env.undo()
        run_module.SYSTEM_METRICS_INTERVAL = old
        os.chdir(cwd)


def test_times_are_the_trials_own(records):
    out, client, exp, trials = records
    assert len(trials) == 2
    parent = client.get_run(out.parent_run_id)
    for a, b in zip(trials, trials[1:]):
        assert a.info.end_time <= b.info.start_time  # one after the other, as they ran
    for r in trials:
        assert r.info.status == "FINISHED" and r.info.end_time > r.info.start_time
        assert parent.info.start_time <= r.info.start_time and r.info.end_time <= parent.info.end_time
    # The parent spans the study (not just the courier's deliveries).
    assert (parent.info.end_time - parent.info.start_time) >= sum(r.info.end_time - r.info.start_time for r in trials)


def test_experiment_opens_in_model_training_mode_on_the_study_view(records):
    _, _, exp, _ = records
    assert exp.tags[KIND_TAG] == MODEL_TRAINING and exp.tags["sweeper.study"] == "rec"
    assert exp.tags["mlflow.note.content"] == "Records of a tiny grid."
    state = json.loads(exp.tags[SHARED_VIEW_PREFIX + VIEW_KEY])
    assert state["orderByKey"] == "metrics.`eval_acc`" and state["orderByAsc"] is False
    assert {"params.`optim.name`", "params.`optim.lr`", "metrics.`eval_acc`"} <= set(state["selectedColumns"])
    assert [c["metricKey"] for c in state["compareRunCharts"]][:2] == ["eval_acc", "train_loss"]
    assert experiment_url("http://h:1", exp.experiment_id).endswith(
        f"/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=sweeper")


def test_inputs_tags_and_system_metrics(records):
    _, _, _, trials = records
    for r in trials:
        inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in r.inputs.dataset_inputs}
        assert set(inputs) == {"train", "val"}, inputs
        assert json.loads(inputs["train"].profile)["num_examples"] == 1280
        assert json.loads(inputs["val"].profile)["num_examples"] == 320
        assert inputs["train"].name == "synthetic-train" and len(inputs["train"].digest) == 8
        tags = r.data.tags
        for package in ("sweeper", "torch", "optuna", "mlflow"):
            assert tags[f"sweeper.version.{package}"], package
        assert tags["sweeper.host"] and tags["sweeper.kind"] == "trial"
        import pathlib

        if (pathlib.Path(__file__).resolve().parents[1] / ".git").exists():
            assert len(tags["mlflow.source.git.commit"]) == 40
    assert any(k.startswith("system/cpu_utilization") for r in trials for k in r.data.metrics), \
        [sorted(r.data.metrics) for r in trials]


def test_model_loads_back_and_predicts_the_final_evaluation(records):
    import mlflow
    import mlflow.pytorch
    import torch

    from trainers.config import TrainConfig
    from trainers.data import load_dataset, normalize

    _, client, _, trials = records
    mlflow.set_tracking_uri(client.tracking_uri)
    for r in trials:
        assert r.outputs.model_outputs, "no logged model"
        model = mlflow.pytorch.load_model(f"runs:/{r.info.run_id}/model")
        cfg = TrainConfig.from_yaml(client.download_artifacts(r.info.run_id, "config.yaml"), [])
        data = load_dataset(cfg.data, cfg.seed, log=lambda m: None)
        x = normalize(data.eval_x, torch.tensor(data.mean), torch.tensor(data.std))
        with torch.no_grad():
            acc = (model(x).argmax(1) == data.eval_y).float().mean().item() * 100
        assert acc == pytest.approx(r.data.metrics["eval_acc"], abs=1e-3)
        info = mlflow.models.get_model_info(f"runs:/{r.info.run_id}/model")
        assert info.signature.inputs.inputs[0].shape == (-1, 1, 16, 16)


def test_keep_models_keeps_the_best_k_trials_models(workdir, monkeypatch):
    """keep_models: 1: of three trials, only the best one's run keeps a logged model (a trial that finishes
    outside the best k logs none; one pushed out of them loses its model)."""
    from mlflow.tracking import MlflowClient

    from sweeper.study.attrs import A_RUN_PREFIX

    monkeypatch.setenv("SWEEPER_FLUSH_TIMEOUT", "300")  # a busy machine: wait for the models, never spool

    uri = f"sqlite:///{workdir}/mlruns/mlflow.db"
    spec = write_spec(workdir / "k.yaml", "keep", keep_models=1, grid={"optim.lr": [0.002, 0.05, 0.2]})
    out = st.run(load_spec(str(spec)), tracking_uri=uri, quiet=True, echo=lambda line: None)
    assert out.complete
    best = max(out.study.best_trials, key=lambda t: t.value)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("keep")
    models = client.search_logged_models([exp.experiment_id])
    best_run = best.user_attrs.get(st.T_RUN) or out.study.user_attrs[f"{A_RUN_PREFIX}{best.number}"]
    assert [m.source_run_id for m in models] == [best_run], [
        (t.number, t.value, t.user_attrs.get(st.T_RUN)) for t in out.study.trials]
