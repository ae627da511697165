import pytest

from trainers.config import ConfigError, TrainConfig, parse_override


def test_defaults_validate_and_flatten():
    cfg = TrainConfig.from_dict({})
    flat = cfg.flat()
    assert flat["optim.name"] == "sgdm" and flat["distributed.workers"] == 1
    assert flat["distributed.network.preset"] == "10gbe"


def test_yaml_values_and_overrides_are_coerced():
    cfg = TrainConfig.from_dict({"optim": {"lr": "1e-3", "betas": [0.8, 0.9]}, "epochs": 3.0},
                                ["schedule.milestones=[2, 4]", "data.subset=100", "precision=bf16"])
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.schedule.milestones == [2.0, 4.0]
    assert cfg.data.subset == 100 and cfg.precision == "bf16"


def test_a_whole_subconfig_can_be_set():
    cfg = TrainConfig.from_dict({"distributed": {"algorithm": "local", "workers": 2}},
                                {"optim": {"name": "lars", "lr": 0.25}, "distributed.slowmo": {"alpha": 0.75}})
    assert cfg.optim.name == "lars" and cfg.optim.lr == 0.25 and cfg.optim.momentum == 0.9
    assert cfg.distributed.slowmo.alpha == 0.75 and cfg.distributed.slowmo.beta == 0.0


@pytest.mark.parametrize("raw, overrides, message", [
    ({"optim": {"lrr": 1}}, [], "optim.lrr: unknown key (did you mean optim.lr?)"),
    ({"optim": {"name": "lamd"}}, [], "optim.name: unknown value 'lamd'"),
    ({"model": {"name": "lenet"}}, [], "model.name: unknown value 'lenet'; choose one of lenet5, lenet5-classic, "
                                       "resnet, torchvision/<builder>, package.module:callable"),
    ({}, ["model.name=torchvision/res-net"],
     "model.name: 'torchvision/res-net' is not of the form torchvision/<builder>"),
    ({}, ["data.dataset=mnist"], "data.dataset: unknown value 'mnist'; choose one of fashion-mnist, cifar10"),
    ({"optim": {"lr": "fast"}}, [], "optim.lr: expected a number"),
    ({"optim": {"lr": -1}}, [], "optim.lr: must be positive"),
    ({"epochs": 1.5}, [], "epochs: expected an integer"),
    ({"channels_last": "yes"}, [], "channels_last: expected true or false"),
    ({"optim": 3}, [], "optim: expected a mapping"),
    ({}, ["distributed.workers=4"], "distributed.workers: 4 workers need a distributed.algorithm"),
    ({}, ["epochs"], "expected KEY=VALUE"),
    ({}, ["epochs.x=1"], "epochs: is a value"),
    ({"distributed": {"algorithm": "decentralized", "workers": 4, "slowmo": {"alpha": 0.5}}}, [],
     "distributed.slowmo: needs an averaging algorithm"),
])
def test_errors_name_the_key(raw, overrides, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(raw, overrides)
    assert message in str(err.value)


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        TrainConfig.from_yaml(str(bad))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("optim:\n  weight_decai: 0.1\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: optim.weight_decai: unknown key \(did you mean optim.weight_decay"):
        TrainConfig.from_yaml(str(wrong))
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        TrainConfig.from_yaml(str(tmp_path / "missing.yaml"))


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=ring") == ("a", "ring")
    assert parse_override("a={x: 1}") == ("a", {"x": 1})


def test_model_name_takes_torchvision_builders_and_user_callables_without_importing_them():
    for name in ("torchvision/resnet18", "mypackage.nets:tiny_cnn", "nets:Zoo.cnn"):
        assert TrainConfig.from_dict({"model": {"name": name}}).flat()["model.name"] == name
