"""Models from outside this package: `torchvision/<builder>` and a user's `package.module:callable`.

Config validation checks these names by shape only (it must not import torch); this module checks the
rest when the model is built, and every problem is one ConfigError line naming `model.name`. Each model
built here is then run once on a dummy batch of the dataset's shape (`_dry_run`), so a model that does
not fit the data (wrong input size, wrong number of logits, not a tensor out) stops before training.
"""
from __future__ import annotations

import difflib
import importlib
import inspect

import torch
from torch import nn

from ..config import ConfigError, ModelConfig

KEY = "model.name"


def torchvision_model(cfg: ModelConfig, channels: int, image_size: int, classes: int) -> nn.Module:
    """`torchvision/<builder>`: `torchvision.models.get_model(builder, weights=None, num_classes=classes)`.

    Untrained (`weights=None`). Builders are torchvision's classification models (`list_models(module=
    torchvision.models)`). For a dataset with other than 3 channels the first convolution is replaced by
    one with the dataset's channels (`_adapt_first_conv`)."""
    import torchvision.models as tvm

    builder = cfg.name.split("/", 1)[1]
    known = tvm.list_models(module=tvm)  # classification only: detection etc. return other outputs
    if builder not in known:
        close = difflib.get_close_matches(builder, known, n=1)
        hint = f" (did you mean 'torchvision/{close[0]}'?)" if close else ""
        raise ConfigError(f"{KEY}: torchvision {_version()} has no classification model {builder!r}{hint}; "
                          "torchvision.models.list_models(module=torchvision.models) lists them")
    model = tvm.get_model(builder, weights=None, num_classes=classes)
    if channels != 3:
        _adapt_first_conv(model, channels, cfg.name)
    _dry_run(model, cfg.name, channels, image_size, classes)
    return model


def _adapt_first_conv(model: nn.Module, channels: int, name: str) -> None:
    """Replace the first Conv2d (torchvision's models take RGB there) with one taking `channels` inputs.

    Input channel i of the new weight is the builder's channel i mod 3, so the new layer keeps the
    builder's own initialisation (its scheme and scale per element); the bias is kept as is."""
    found = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None or found[1].in_channels != 3:
        raise ConfigError(f"{KEY}: {name}: found no first convolution with 3 input channels to adapt to the "
                          f"dataset's {channels}")
    path, old = found
    new = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, old.bias is not None, old.padding_mode)
    with torch.no_grad():
        new.weight.copy_(old.weight[:, torch.arange(channels) % 3])
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, new)


def user_model(cfg: ModelConfig, channels: int, image_size: int, classes: int) -> nn.Module:
    """`package.module:callable`, called as `callable(channels, image_size, num_classes)`; it must return an
    `nn.Module` mapping [N, channels, image_size, image_size] to logits [N, num_classes]. The module is
    imported from the Python path (for one in the working directory: PYTHONPATH=.)."""
    module, _, attr = cfg.name.partition(":")
    try:
        obj = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or not (module == err.name or module.startswith(err.name + ".")):
            raise  # the user's module was found and failed to import something of its own: their traceback
        raise ConfigError(f"{KEY}: {cfg.name}: no module named {err.name!r} on the Python path "
                          "(for a module in the working directory, set PYTHONPATH=.)") from None
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module if i == 0 else f"{module}:{'.'.join(attr.split('.')[:i])}"
            raise ConfigError(f"{KEY}: {cfg.name}: {where} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{KEY}: {cfg.name} is not callable (it is a {type(obj).__name__})")
    try:
        inspect.signature(obj).bind(channels, image_size, classes)
    except TypeError as err:
        raise ConfigError(f"{KEY}: {cfg.name} cannot be called as {attr}(channels, image_size, num_classes): "
                          f"{err}") from None
    except ValueError:  # no signature to inspect (some builtins): calling it will tell
        pass
    model = obj(channels, image_size, classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{KEY}: {cfg.name}({channels}, {image_size}, {classes}) returned a "
                          f"{type(model).__name__}, not a torch.nn.Module")
    _dry_run(model, cfg.name, channels, image_size, classes)
    return model


def _dry_run(model: nn.Module, name: str, channels: int, image_size: int, classes: int) -> None:
    """One forward pass in training mode on 2 zero images of the dataset's shape; logits [2, classes] must
    come out. It leaves no trace: the RNG is forked (dropout, stochastic depth) and the buffers (BatchNorm's
    running statistics) are restored, so a run is the same as without it."""
    shape = f"{channels}x{image_size}x{image_size}"
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            out = model(torch.zeros(2, channels, image_size, image_size, device=device))
    except Exception as err:  # noqa: BLE001 - any failure here means the model does not fit the data
        raise ConfigError(f"{KEY}: {name} does not run on the dataset's {shape} images: "
                          f"{type(err).__name__}: {' '.join(str(err).split())}") from err
    finally:
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in saved and b.shape == saved[k].shape:
                    b.copy_(saved[k])
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"{KEY}: {name} returns a {type(out).__name__} in training mode, not a tensor of logits")
    if tuple(out.shape) != (2, classes):
        raise ConfigError(f"{KEY}: {name} maps 2 images of {shape} to outputs of shape {tuple(out.shape)}; "
                          f"expected (2, {classes}): one logit per class")


def _version() -> str:
    import torchvision

    return torchvision.__version__.split("+")[0]
