import math

import pytest
import torch

from trainers import ConfigError, TrainConfig
from trainers.config import ModelConfig
from trainers.models import build_model
from trainers.checkpoints import CHECKPOINT
from trainers.train import train


def quiet(_):
    pass


def tiny(**overrides):
    raw = {"data": {"dataset": "synthetic", "split": "val", "augment": False,
                    "synthetic": {"train_size": 320, "test_size": 64, "channels": 1, "image_size": 16, "classes": 4}},
           "model": {"name": "lenet5-classic"}, "optim": {"name": "sgdm", "lr": 0.2},
           "schedule": {"name": "cosine", "warmup_epochs": 0.5}, "epochs": 2, "batch_size": 32}
    return TrainConfig.from_dict(raw, overrides)


def test_train_learns_and_reports_every_epoch():
    seen = []
    result = train(tiny(epochs=3), on_epoch=seen.append, log=quiet)
    assert result.status == "completed" and result.epochs_completed == 3
    assert [r.epoch for r in seen] == [1, 2, 3] and seen == result.history
    assert seen[-1].eval_acc > 60.0  # 4 learnable classes: chance is 25%
    assert seen[-1].train_loss < seen[0].train_loss
    for r in seen:
        assert r.images_per_sec > 0 and r.epoch_time > 0 and math.isfinite(r.eval_loss)
    assert seen[-1].lr == pytest.approx(0.0, abs=1e-9)  # cosine ends at 0


def test_same_seed_same_run_other_seed_other_run():
    a = train(tiny(), log=quiet).history[-1]
    b = train(tiny(), log=quiet).history[-1]
    c = train(tiny(seed=1), log=quiet).history[-1]
    assert (a.train_loss, a.eval_loss) == (b.train_loss, b.eval_loss)
    assert a.train_loss != c.train_loss


class Killed(Exception):
    pass


@pytest.mark.parametrize("overrides", [{}, {"optim": {"name": "adamw", "lr": 1e-3}, "data.augment": True}])
def test_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path, overrides):
    cfg = tiny(epochs=3, **overrides)
    straight = train(cfg, checkpoint_dir=tmp_path / "a", log=quiet)

    def kill_after_first(report):
        if report.epoch == 1:
            raise Killed  # the checkpoint of epoch 1 is already written

    with pytest.raises(Killed):
        train(cfg, on_epoch=kill_after_first, checkpoint_dir=tmp_path / "b", log=quiet)
    resumed_reports = []
    resumed = train(cfg, on_epoch=resumed_reports.append, checkpoint_dir=tmp_path / "b", log=quiet)
    assert [r.epoch for r in resumed_reports] == [2, 3]  # epoch 1 is not trained again
    key = lambda r: (r.train_loss, r.train_acc, r.eval_loss, r.eval_acc, r.lr)  # noqa: E731
    assert [key(r) for r in resumed.history] == [key(r) for r in straight.history]
    a = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=False)["runner"]["model"]
    b = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)["runner"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("epochs", [1, 2])
def test_a_failed_checkpoint_write_fails_the_run(tmp_path, epochs):
    """Checkpoints are written by a thread while training goes on; its error still reaches the caller,
    at the next epoch's save or when train() ends."""
    (tmp_path / "checkpoint.tmp").mkdir()  # torch.save cannot write its temporary file
    with pytest.raises((RuntimeError, OSError), match="[Ii]s a directory"):
        train(tiny(epochs=epochs), checkpoint_dir=tmp_path, log=quiet)


def test_finished_checkpoint_is_not_trained_again(tmp_path):
    cfg = tiny()
    first = train(cfg, checkpoint_dir=tmp_path, log=quiet)
    calls = []
    again = train(cfg, on_epoch=calls.append, checkpoint_dir=tmp_path, log=quiet)
    assert calls == [] and again.history == first.history


def test_checkpoint_of_another_config_is_refused(tmp_path):
    train(tiny(epochs=1), checkpoint_dir=tmp_path, log=quiet)
    with pytest.raises(ConfigError, match=r"different config \(differs in: optim.lr\)"):
        train(tiny(epochs=1, **{"optim.lr": 0.01}), checkpoint_dir=tmp_path, log=quiet)


def test_divergence_is_an_outcome_not_a_crash():
    reports = []
    result = train(tiny(epochs=3, **{"optim.lr": 1e4, "schedule.warmup_epochs": 0}), on_epoch=reports.append, log=quiet)
    assert result.status == "diverged"
    assert result.epochs_completed == 1 and len(reports) == 1
    assert math.isnan(reports[0].train_loss)
    assert "train_loss" not in reports[0].metrics()  # non-finite values are not sent to trackers


def test_batch_larger_than_the_data_is_a_clear_error():
    with pytest.raises(ConfigError, match="batch_size: batch_size=512 is larger than the 256 training examples"):
        train(tiny(batch_size=512), log=quiet)


def test_bf16_channels_last_runs_and_learns():
    result = train(tiny(epochs=3, precision="bf16", channels_last=True), log=quiet)
    assert result.status == "completed" and result.history[-1].eval_acc > 60.0


@pytest.mark.parametrize("name, channels, size, fc1_in", [("lenet5", 3, 32, 1600), ("lenet5", 1, 28, 1024),
                                                          ("lenet5-classic", 3, 32, 400)])
def test_lenet5_shapes_follow_the_dataset(name, channels, size, fc1_in):
    model = build_model(ModelConfig(name=name), channels, size, 100)
    assert model.fc1.in_features == fc1_in
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 100)
    if name == "lenet5":  # Poiatti et al.'s widths
        assert (model.conv1.out_channels, model.conv2.out_channels) == (64, 64)
        assert (model.fc1.out_features, model.fc2.out_features) == (384, 192)


def test_resnet_has_batchnorm_buffers():
    model = build_model(ModelConfig(name="resnet", width=8), 3, 32, 10)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert any(name.endswith("running_mean") for name, _ in model.named_buffers())
