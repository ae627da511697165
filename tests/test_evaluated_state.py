"""The model a checkpoint's last evaluation measured, rebuilt from the checkpoint alone (what a study logs
to MLflow as the trial's model): one model's weights, or the K workers' average."""
import pytest
import torch
from engine_runs import config, distributed

from trainers.checkpoints import CHECKPOINT, evaluated_state
from trainers.data import load_dataset, normalize
from trainers.models import build_model
from trainers.train import train


@pytest.mark.parametrize("cfg", [config(), distributed("local", 2, **{"distributed.local_steps": 3}),
                                 distributed("diloco", 2, **{"distributed.local_steps": 4})],
                         ids=["one model", "local K=2", "diloco K=2"])
def test_the_rebuilt_model_predicts_the_final_evaluation(cfg, tmp_path):
    result = train(cfg, checkpoint_dir=tmp_path, log=lambda _: None)
    data = load_dataset(cfg.data, cfg.seed, log=lambda _: None)
    model = build_model(cfg.model, data.train_x.shape[1], data.train_x.shape[2], data.num_classes)
    payload = torch.load(tmp_path / CHECKPOINT, map_location="cpu", weights_only=False)
    assert evaluated_state(payload, model) is not None
    x = normalize(data.eval_x, torch.tensor(data.mean), torch.tensor(data.std))
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == data.eval_y).float().mean().item() * 100
    assert acc == pytest.approx(result.history[-1].eval_acc, abs=1e-3)


def test_a_checkpoint_without_a_model_gives_none():
    cfg = config()
    model = build_model(cfg.model, 1, 16, 4)
    assert evaluated_state({"runner": {"rank": 0}}, model) is None
