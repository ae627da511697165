"""Models from outside the package: `torchvision/<builder>` and a user's `package.module:callable`."""
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from trainers.config import ConfigError, DataConfig, ModelConfig, OptimConfig, SyntheticConfig, TrainConfig
from trainers.data import load_dataset, normalize
from trainers.models import build_model
from trainers.models.external import _dry_run
from trainers.optim import build_optimizer

# A user's models, written out as a package on sys.path, so that model.name reaches them by dotted path.
USER_NETS = textwrap.dedent('''
    import torch
    from torch import nn


    def tiny_cnn(channels, image_size, num_classes):
        return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


    class Zoo:
        @staticmethod
        def mlp(channels, image_size, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(channels * image_size * image_size, num_classes))


    def ten_logits(channels, image_size, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(channels * image_size * image_size, 10))


    def no_arguments():
        return nn.Identity()


    def not_a_module(channels, image_size, num_classes):
        return {"channels": channels}


    NOT_CALLABLE = 42
''')


@pytest.fixture
def userpkg(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_NETS)
    (pkg / "broken.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg"
    for name in [m for m in sys.modules if m == "userpkg" or m.startswith("userpkg.")]:
        del sys.modules[name]


def tiny_data(channels):
    cfg = DataConfig(dataset="synthetic", split="test", augment=False,
                     synthetic=SyntheticConfig(train_size=16, test_size=8, channels=channels, image_size=16, classes=4))
    return load_dataset(cfg, seed=0, log=lambda _: None)


def one_step(name, channels):
    """One SGD step of model `name` on a batch of the tiny synthetic set; the loss and the model."""
    data = tiny_data(channels)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), data.channels, data.image_size, data.num_classes)
    opt = build_optimizer(model.named_parameters(), OptimConfig(name="sgdm", lr=0.1), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x = normalize(data.train_x[:8], data.mean, data.std)
    loss = F.cross_entropy(model(x), data.train_y[:8])
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return loss, model


# --------------------------------------------------------------------------------------------------
# torchvision/<builder>


@pytest.mark.parametrize("channels", [3, 1])
def test_torchvision_resnet18_trains_a_step_on_the_datasets_shape(channels):
    _, model = one_step("torchvision/resnet18", channels)
    assert model.conv1.in_channels == channels and model.fc.out_features == 4


def test_adapted_first_conv_keeps_the_builders_initialisation():
    import torchvision

    torch.manual_seed(0)
    rgb = torchvision.models.get_model("resnet18", weights=None, num_classes=4)
    for channels in (1, 4):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="torchvision/resnet18"), channels, 16, 4)
        assert model.conv1.weight.shape == (64, channels, 7, 7)
        torch.testing.assert_close(model.conv1.weight, rgb.conv1.weight[:, [i % 3 for i in range(channels)]])
        torch.testing.assert_close(model.fc.weight, rgb.fc.weight)  # the rest is the builder's, unchanged


def test_unknown_torchvision_builder_is_one_config_error():
    with pytest.raises(ConfigError, match=r"^model.name: torchvision [\d.]+ has no classification model "
                                          r"'resnet19' \(did you mean 'torchvision/resnet18'\?\)"):
        build_model(ModelConfig(name="torchvision/resnet19"), 3, 32, 10)
    with pytest.raises(ConfigError, match="has no classification model 'fasterrcnn_resnet50_fpn'"):
        build_model(ModelConfig(name="torchvision/fasterrcnn_resnet50_fpn"), 3, 32, 10)  # detection


def test_torchvision_model_that_does_not_fit_the_data_is_one_config_error():
    with pytest.raises(ConfigError, match=r"^model.name: torchvision/squeezenet1_1 does not run on the dataset's "
                                          r"3x8x8 images: RuntimeError: "):
        build_model(ModelConfig(name="torchvision/squeezenet1_1"), 3, 8, 10)


@pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet")
def test_torchvision_model_with_auxiliary_outputs_is_refused():
    with pytest.raises(ConfigError, match="torchvision/googlenet returns a GoogLeNetOutputs in training mode, not a"):
        build_model(ModelConfig(name="torchvision/googlenet"), 3, 32, 10)


# --------------------------------------------------------------------------------------------------
# package.module:callable


@pytest.mark.parametrize("name", ["userpkg.nets:tiny_cnn", "userpkg.nets:Zoo.mlp"])
def test_user_callable_trains_a_step(userpkg, name):
    _, model = one_step(name, channels=1)
    assert model(torch.zeros(3, 1, 16, 16)).shape == (3, 4)


@pytest.mark.parametrize("name, message", [
    ("nowhere.nets:tiny_cnn", "model.name: nowhere.nets:tiny_cnn: no module named 'nowhere' on the Python path "
                              "(for a module in the working directory, set PYTHONPATH=.)"),
    ("userpkg.absent:tiny_cnn", "no module named 'userpkg.absent' on the Python path"),
    ("userpkg.nets:tiny", "model.name: userpkg.nets:tiny: userpkg.nets has no attribute 'tiny'"),
    ("userpkg.nets:Zoo.cnn", "model.name: userpkg.nets:Zoo.cnn: userpkg.nets:Zoo has no attribute 'cnn'"),
    ("userpkg.nets:NOT_CALLABLE", "model.name: userpkg.nets:NOT_CALLABLE is not callable (it is a int)"),
    ("userpkg.nets:no_arguments", "model.name: userpkg.nets:no_arguments cannot be called as "
                                  "no_arguments(channels, image_size, num_classes): too many positional arguments"),
    ("userpkg.nets:not_a_module", "model.name: userpkg.nets:not_a_module(1, 16, 4) returned a dict, "
                                  "not a torch.nn.Module"),
    ("userpkg.nets:ten_logits", "model.name: userpkg.nets:ten_logits maps 2 images of 1x16x16 to outputs of "
                                "shape (2, 10); expected (2, 4): one logit per class"),
])
def test_user_callable_errors_are_one_config_error_line(userpkg, name, message):
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name=name), 1, 16, 4)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_dependency_of_the_users_module_keeps_its_traceback(userpkg):
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        build_model(ModelConfig(name="userpkg.broken:net"), 1, 16, 4)


def test_dry_run_leaves_no_trace(userpkg):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="userpkg.nets:tiny_cnn"), 1, 16, 4)
    buffers = {k: b.clone() for k, b in model.state_dict().items()}
    rng = torch.get_rng_state()
    _dry_run(model, "userpkg.nets:tiny_cnn", 1, 16, 4)  # BatchNorm in training mode, Dropout
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(buffers[k], b) for k, b in model.state_dict().items())
    assert int(model[1].num_batches_tracked) == 0


@pytest.mark.parametrize("name", ["torchvision/resnet18", "userpkg.nets:tiny_cnn"])
def test_external_models_train_end_to_end(userpkg, name):
    from trainers.train import train

    raw = {"data": {"dataset": "synthetic", "split": "val", "augment": True,
                    "synthetic": {"train_size": 80, "test_size": 16, "channels": 1, "image_size": 16, "classes": 4}},
           "model": {"name": name}, "optim": {"name": "lamb", "lr": 1e-3}, "epochs": 1, "batch_size": 32}
    result = train(TrainConfig.from_dict(raw), log=lambda _: None)
    assert result.status == "completed" and result.epochs_completed == 1
