"""Runs of the K-worker engine on a small synthetic set (16x16, 4 classes) with LeNet-5-classic: each well
under a second. Shared by the engine's tests."""
import pytest
import torch

from trainers.config import TrainConfig
from trainers.data import load_dataset
from trainers.runner import make_runner

DEVICE = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and far faster on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(**overrides) -> TrainConfig:
    raw = {"data": {"dataset": "synthetic", "split": "test", "augment": False,
                    "synthetic": {"train_size": 384, "test_size": 128, "image_size": 16, "classes": 4}},
           "model": {"name": "lenet5-classic"}, "optim": {"name": "sgdm", "lr": 0.05},
           "schedule": {"name": "cosine"}, "batch_size": 16, "epochs": 2, "device": "cpu"}
    return TrainConfig.from_dict(raw, overrides)


def distributed(algorithm: str, workers: int, **overrides) -> TrainConfig:
    return config(**{"distributed.algorithm": algorithm, "distributed.workers": workers, **overrides})


def build(cfg: TrainConfig):
    """A runner made as `train()` makes it (same seeding, so the same initial weights)."""
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, cfg.seed, log=lambda _: None).to(DEVICE)
    return make_runner(cfg, data, DEVICE, None)


def run(cfg: TrainConfig, runner=None):
    runner = runner or build(cfg)
    for epoch in range(cfg.epochs):
        runner.train_epoch(epoch)
    return runner


def params(runner) -> torch.Tensor:
    """The evaluated model's parameters and buffers, flat."""
    state = runner.eval_model().state_dict()
    return torch.cat([t.detach().double().reshape(-1) for t in state.values()])


def assert_close(a, b, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(params(a), params(b), rtol=rtol, atol=atol)


def dropout_net(channels: int, image_size: int, num_classes: int) -> torch.nn.Module:
    """A model of the user's own (`model.name: engine_runs:dropout_net`) with a random op in its forward."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * image_size * image_size, 32),
                               torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, num_classes))
