"""Bad input that `sweeper study validate` must reject (and so `study run` never starts): each case is one
error line naming the file, the key and the reason. Nothing here trains, imports torch or starts a server."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY_BASE, subprocess_env, write_spec

from sweeper.spec import SpecError, StudySpec, changed_keys, load_spec
from trainers.config import ConfigError, TrainConfig, parse_override
from trainers.results import (ENGINE_METRICS, EpochReport, TrainResult, all_metrics,
                              metrics_for, reported_metrics)

LOCAL = {**TINY_BASE, "distributed": {"algorithm": "local", "workers": 2, "local_steps": 2}}


def spec_error(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


def bad_spec(tmp_path: Path, **fields) -> str:
    return spec_error(write_spec(tmp_path / "bad.yaml", "bad", **fields))


def bad_text(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return spec_error(path)


def config_error(raw=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(raw or {}, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def validate_cli(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeper.cli", "study", "validate", str(path)], capture_output=True,
                          text=True, cwd=path.parent, env=subprocess_env(path.parent), timeout=120)


def assert_one_error_line(out: subprocess.CompletedProcess, *expected: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    for text in expected:
        assert text in lines[0], lines[0]


# --------------------------------------------------------------------------------------------------
# 1. The objective metric must be one that every trial's config reports


def test_unknown_metric_is_rejected_with_what_a_run_reports(tmp_path):
    msg = bad_spec(tmp_path, objective={"metric": "accuracy"})
    assert "objective.metric: unknown metric 'accuracy'; a run reports train_loss, train_acc, eval_loss" in msg
    assert "also compute_time" in msg and "dynamic-local and adaptive-local also local_steps" in msg


def test_engine_metric_on_a_centralized_base(tmp_path):
    msg = bad_spec(tmp_path, objective={"metric": "comm_rounds"})
    assert ("objective.metric: 'comm_rounds' is not reported by a centralized run (distributed.algorithm: "
            "centralized); it reports: train_loss, ") in msg
    assert "comm_rounds is reported with distributed.algorithm minibatch, local, post-local" in msg


def test_controller_metric_on_a_local_run(tmp_path):
    msg = bad_spec(tmp_path, base=LOCAL, objective={"metric": "local_steps"})
    assert "objective.metric: 'local_steps' is not reported by a local run (distributed.algorithm: local)" in msg
    assert "local_steps is reported with distributed.algorithm dynamic-local or adaptive-local" in msg


def test_metric_missing_at_some_grid_points_names_the_point(tmp_path):
    msg = bad_spec(tmp_path, objective={"metric": "comm_bytes"},
                   grid={"distributed.algorithm": ["local", "centralized"]})
    assert ("objective.metric: 'comm_bytes' is not reported by a centralized run (distributed.algorithm: centralized, "
            "at grid point distributed.algorithm=centralized seed=0)") in msg


def test_metric_missing_at_a_search_choice_names_it(tmp_path):
    msg = bad_spec(tmp_path, kind="tune", grid={}, budget=3, base={**TINY_BASE, "distributed": {"workers": 2}},
                   objective={"metric": "local_steps"},
                   search={"distributed.algorithm": {"choices": ["dynamic-local", "local"]}})
    assert "objective.metric: 'local_steps' is not reported by a local run (distributed.algorithm: local, at " \
           "search.distributed.algorithm value local)" in msg


@pytest.mark.parametrize("base, metric", [
    (TINY_BASE, "eval_loss"), (TINY_BASE, "total_time"), (TINY_BASE, "best_eval_acc"), (TINY_BASE, "epochs_completed"),
    (LOCAL, "comm_time_modeled"), (LOCAL, "local_steps_mean"), (LOCAL, "wall_time_modeled"),
    ({**LOCAL, "distributed": {"algorithm": "dynamic-local", "workers": 2}}, "local_steps"),
])
def test_reported_metrics_are_accepted(tmp_path, base, metric):
    path = write_spec(tmp_path / "ok.yaml", "ok", base=base, objective={"metric": metric, "direction": "minimize"})
    assert load_spec(str(path)).objective.metric == metric


def fake_result(algorithm: str) -> TrainResult:
    """A result shaped as train() returns it for this algorithm (extra/totals as the engine fills them)."""
    engine = {} if algorithm == "centralized" else {k: 1.0 for k in ENGINE_METRICS}
    extra = {**engine, **({"local_steps": 4.0} if algorithm in ("dynamic-local", "adaptive-local") else {})}
    history = [EpochReport(epoch=e, train_loss=1.0, train_acc=50.0, eval_loss=1.0, eval_acc=50.0, lr=0.1,
                           epoch_time=1.0, eval_time=0.1, images_per_sec=100.0, extra=dict(extra)) for e in (1, 2)]
    return TrainResult(status="completed", epochs_completed=2, history=history, total_time=2.5, device="cpu",
                       totals=dict(engine))


@pytest.mark.parametrize("algorithm", ["centralized", "minibatch", "local", "dynamic-local", "adaptive-local"])
def test_reported_metrics_agree_with_objective_value(algorithm):
    """Every name reported_metrics() lists gives a trial its value; every other known name fails the trial."""
    from sweeper.run import objective_value

    result = fake_result(algorithm)
    reported = metrics_for(algorithm)
    for metric in all_metrics():
        spec = StudySpec.from_dict({"name": "m", "kind": "grid", "base": TINY_BASE, "seeds": [0, 1]})
        spec.objective.metric = metric
        if metric in reported:
            assert isinstance(objective_value(spec, result), float), metric
        else:
            with pytest.raises(ValueError, match="was not reported"):
                objective_value(spec, result)
    epoch = set(result.history[-1].metrics())
    summary = {k for k, v in result.summary().items() if isinstance(v, (int, float))}
    assert set(reported) == epoch | summary


def test_reported_metrics_of_a_config():
    assert "comm_rounds" not in reported_metrics(TrainConfig.from_dict(TINY_BASE))
    assert "comm_rounds" in reported_metrics(TrainConfig.from_dict(LOCAL))


def test_unreported_metric_through_the_cli(tmp_path):
    path = write_spec(tmp_path / "central.yaml", "central", objective={"metric": "comm_rounds"})
    assert_one_error_line(validate_cli(path), f"error: {path}: objective.metric: 'comm_rounds' is not reported by a "
                                              "centralized run (distributed.algorithm: centralized)")


# --------------------------------------------------------------------------------------------------
# 2. Duplicate YAML keys (spec files, config files, --set values)

SPEC_HEAD = "name: dup\nkind: grid\n"


@pytest.mark.parametrize("text, expected", [
    ("name: dup\nkind: grid\nname: other\n", "name: duplicate key at line 3, column 1 (first at line 1, column 1)"),
    (SPEC_HEAD + "base:\n  optim:\n    lr: 0.1\n    lr: 0.2\n", "base.optim.lr: duplicate key at line 6, column 5 "
                                                                "(first at line 5, column 5)"),
    (SPEC_HEAD + "grid:\n  optim.lr: [0.1]\n  optim.lr: [0.2]\n",
     "grid.optim.lr: duplicate key at line 5, column 3 (first at line 4, column 3)"),
    (SPEC_HEAD + "grid:\n  optim: [{name: sgdm}, {name: lars, lr: 1, lr: 2}]\n",
     "grid.optim[1].lr: duplicate key at line 4, column 45 (first at line 4, column 38)"),
])
def test_duplicate_keys_in_a_spec(tmp_path, text, expected):
    assert f"bad.yaml: {expected}; give each key once" in bad_text(tmp_path, text)


def test_yaml_merge_keys_may_override(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("optim:\n  <<: {lr: 0.1, momentum: 0.5}\n  lr: 0.2\n")
    cfg = TrainConfig.from_yaml(str(path))
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.2, 0.5)


def test_duplicate_key_in_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\noptim:\n  name: lamb\nepochs: 5\n")
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_yaml(str(path))
    assert str(info.value) == (f"{path}: epochs: duplicate key at line 4, column 1 (first at line 1, column 1); "
                               "give each key once")


def test_duplicate_key_in_a_set_value():
    with pytest.raises(ConfigError) as info:
        parse_override("optim={name: lars, lr: 0.25, lr: 0.5}")
    assert str(info.value) == ("override 'optim={name: lars, lr: 0.25, lr: 0.5}': optim.lr: duplicate key at column 30 "
                               "(first at column 20); give each key once")


def test_duplicate_key_through_the_cli(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump({"name": "dup", "kind": "grid", "base": TINY_BASE}, sort_keys=False)
                    + "grid: {optim.lr: [0.05, 0.1]}\nseeds: [0]\nseeds: [1]\n")
    assert_one_error_line(validate_cli(path), f"error: {path}: seeds: duplicate key at line")


# --------------------------------------------------------------------------------------------------
# 3. A --set value that is meant as YAML but is not valid: the YAML error, not "expected a mapping"


@pytest.mark.parametrize("item, expected", [
    ("optim={name: lars", "override 'optim={name: lars': optim: not valid YAML: column 18: expected ',' or '}', but "
                          "got '<stream end>' (while parsing a flow mapping started at column 7)"),
    ("schedule.milestones=[30, 60", "override 'schedule.milestones=[30, 60': schedule.milestones: not valid YAML: "
                                    "column 28: expected ',' or ']'"),
    ("data.data_dir='/data", "data.data_dir: not valid YAML: column 21: found unexpected end of stream"),
])
def test_set_value_yaml_errors(item, expected):
    assert expected in config_error(overrides=[item])


def test_set_value_plain_strings_stay_strings():
    assert parse_override("data.data_dir=@scratch/data") == ("data.data_dir", "@scratch/data")
    assert TrainConfig.from_dict({}, ["data.data_dir=%TEMP%/x"]).data.data_dir == "%TEMP%/x"


def test_bad_set_value_through_the_cli(tmp_path):
    from click.testing import CliRunner

    from sweeper.cli import main

    result = CliRunner().invoke(main, ["train", "--no-track", "--set", "optim={name: lars"])
    assert result.exit_code == 2, result.output
    assert "error: override 'optim={name: lars': optim: not valid YAML: column 18" in result.output
    assert "expected a mapping" not in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------------
# 4. Non-finite floats: "must be a finite number" (and a spec with NaN is never stored, whose identity
#    NaN != NaN would make the same spec look changed on every rerun)


@pytest.mark.parametrize("raw, overrides, key", [
    ({"optim": {"lr": float("nan")}}, [], "optim.lr"),
    ({}, ["optim.lr=.nan"], "optim.lr"),
    ({}, ["optim.lr=nan"], "optim.lr"),
    ({}, ["optim.lr=.inf"], "optim.lr"),
    ({}, ["optim.weight_decay=-.inf"], "optim.weight_decay"),
    ({}, ["optim.betas=[0.9, .nan]"], "optim.betas[1]"),
    ({}, ["data.val_fraction=.nan"], "data.val_fraction"),
    ({}, ["schedule.milestones=[.inf]"], "schedule.milestones[0]"),
    ({}, ["schedule.warmup_epochs=.nan"], "schedule.warmup_epochs"),
    ({}, ["divergence_loss=.inf"], "divergence_loss"),
    ({"distributed": {"algorithm": "local", "workers": 2, "network": {"latency_us": float("inf")}}}, [],
     "distributed.network.latency_us"),
    ({"distributed": {"algorithm": "local", "workers": 2, "slowmo": {"beta": float("nan")}}}, [],
     "distributed.slowmo.beta"),
    ({}, [f"optim.lr={10 ** 400}"], "optim.lr"),  # an integer too large for a float
])
def test_non_finite_floats_are_rejected(raw, overrides, key):
    msg = config_error(raw, overrides)
    assert msg.startswith(f"{key}: must be a finite number, got "), msg


@pytest.mark.parametrize("fields, expected", [
    ({"grid": {"optim.lr": [0.1, float("nan")]}}, "grid.optim.lr[1] = nan: optim.lr: must be a finite number, got nan"),
    ({"base": {**TINY_BASE, "optim": {"momentum": float("inf")}}},
     "base.optim.momentum: must be a finite number, got inf"),
    ({"kind": "tune", "grid": {}, "budget": 3, "search": {"optim.lr": {"low": 1e-3, "high": float("inf")}}},
     "search.optim.lr.high: must be a finite number, got inf"),
    ({"kind": "tune", "grid": {}, "budget": 3, "search": {"optim.lr": {"choices": [0.1, float("nan")]}}},
     "search.optim.lr value nan: optim.lr: must be a finite number, got nan"),
])
def test_non_finite_values_in_a_spec(tmp_path, fields, expected):
    assert expected in bad_spec(tmp_path, **fields)


def test_nan_spec_through_the_cli(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump({"name": "nan", "kind": "grid", "base": TINY_BASE}, sort_keys=False)
                    + "grid: {optim.lr: [.nan, 0.1]}\n")
    assert_one_error_line(validate_cli(path), "grid.optim.lr[0] = nan: optim.lr: must be a finite number, got nan")


def test_identical_valid_specs_have_no_changed_keys(tmp_path):
    raw = yaml.safe_load(write_spec(tmp_path / "a.yaml", "a", grid={"optim.lr": [1e-3, 0.1]}).read_text())
    assert changed_keys(StudySpec.from_dict(raw), StudySpec.from_dict(yaml.safe_load(yaml.safe_dump(raw)))) == []


# --------------------------------------------------------------------------------------------------
# 5. Files that are not UTF-8 text


def test_non_utf8_spec(tmp_path):
    msg = bad_text(tmp_path, b"name: caf\xe9\nkind: grid\n")
    assert msg == f"{tmp_path / 'bad.yaml'}: not UTF-8 text: byte 0xe9 at line 1 (invalid continuation byte); save " \
                  "the file as UTF-8"


def test_non_utf8_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"epochs: 2\n# r\xe9glage\n")
    with pytest.raises(ConfigError, match=r"run.yaml: not UTF-8 text: byte 0xe9 at line 2 \(invalid continuation"):
        TrainConfig.from_yaml(str(path))


def test_utf8_with_bom_is_read(tmp_path):
    path = write_spec(tmp_path / "bom.yaml", "bom")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_spec(str(path)).name == "bom"


def test_non_utf8_spec_through_the_cli(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: latin1\nkind: grid\ndescription: réglage\n".encode("latin-1"))
    assert_one_error_line(validate_cli(path), f"error: {path}: not UTF-8 text: byte 0xe9 at line 3")


# --------------------------------------------------------------------------------------------------
# 6. Other holes: wrong types and shapes that gave a traceback or a misleading message


@pytest.mark.parametrize("fields, expected", [
    ({"name": 5}, "name: expected a string, got 5"),
    ({"name": "x\n"}, "name: 'x\\n' must be letters, digits"),
    ({"base": 0}, "base: expected a mapping (a TrainConfig), got 0"),
    ({"base": []}, "base: expected a mapping (a TrainConfig), got []"),
    ({"base": {**TINY_BASE, "seed": "one"}, "seeds": None}, "base.seed: expected an integer, got 'one'"),
    ({"grid": ["optim.lr", 0.1]}, "grid: expected a mapping of dotted keys to lists"),
    ({"grid": {"optim..lr": [0.1, 0.2]}}, "grid.optim..lr: empty part in the dotted key"),
    ({"grid": {"optim.lr": [True, 0.1]}}, "grid.optim.lr[0] = True: optim.lr: expected a number, got True"),
    ({"grid": {"epochs": [False, 2]}}, "grid.epochs[0] = False: epochs: expected an integer, got False"),
    ({"seeds": [True]}, "seeds: expected a non-empty list of integers, got [True]"),
    ({"grid": {"data.data_dir": ["a", yaml.safe_load("2020-01-01")]}},
     "grid.data.data_dir[1] = 2020-01-01: data.data_dir: expected a string, got datetime.date(2020, 1, 1)"),
    ({"grid": {"optim": [{"name": "sgdm"}, {"name": "lars", 1: 2}]}},
     "grid.optim[1] = lars(1=2): optim.1: unknown key"),
    ({"objective": "eval_acc"}, "objective: expected a mapping, got 'eval_acc'"),
    ({"heartbeat": {"interval": 0}}, "heartbeat.interval: must be >= 1 (seconds)"),
    ({"heartbeat": {"grace": -5}}, "heartbeat.grace: must be >= 1 (seconds)"),
    ({"heartbeat": {"max_retry": -1}}, "heartbeat.max_retry: must be >= 0"),
    ({"pruner": {"interval_steps": 0}}, "pruner.interval_steps: must be >= 1"),
    ({"pruner": {"n_warmup_steps": -1}}, "pruner.n_warmup_steps: must be >= 0"),
    ({"sampler": {"n_startup_trials": -1}}, "sampler.n_startup_trials: must be >= 0"),
    ({"budget": True}, "budget: expected an integer, got True"),
])
def test_wrong_types_and_shapes(tmp_path, fields, expected):
    assert expected in bad_spec(tmp_path, **fields)


TUNE = {"kind": "tune", "grid": {}, "budget": 3}


@pytest.mark.parametrize("search, expected", [
    ([{"optim.lr": 0.1}], "search: expected a mapping of dotted keys to {low, high[, log]} or {choices: [...]}"),
    ({"seed": [1, 2]}, "search.seed: a tune study trains one seed per trial; give it under seeds: [N]"),
    ({"optim.lr": {"low": 0.01, "high": 0.1, "step": 0}}, "search.optim.lr.step: must be positive, got 0"),
    ({"optim.lr": {"low": 0.01, "high": 0.1, "step": -0.01}}, "search.optim.lr.step: must be positive"),
    ({"batch_size": {"low": 16.5, "high": 64, "int": True}},
     "search.batch_size.low: an integer range (int: true) needs an integer, got 16.5"),
    ({"batch_size": {"low": 16, "high": 64, "step": 0.5}},
     "search.batch_size.step: an integer range (int: true) needs an integer, got 0.5"),
    ({"optim.name": {"choices": ["sgdm", "lamb", "sgdm"]}}, "search.optim.name.choices: lists a value twice"),
    ({"optim.lr": {"low": True, "high": 0.1}}, "search.optim.lr.low: expected a number, got True"),
    ({"optim..lr": {"low": 0.01, "high": 0.1}}, "search.optim..lr: empty part in the dotted key"),
])
def test_search_space_holes(tmp_path, search, expected):
    assert expected in bad_spec(tmp_path, **TUNE, search=search)


@pytest.mark.parametrize("text, expected", [
    ("name: x\x00\n", "not valid YAML: line 1: character #x0000 is not allowed in YAML"),
    ("name: x\nkind: grid\ngrid: {optim.lr: [0.1, 0.2}\n", "not valid YAML: line 3, column 27: expected ',' or ']', "
                                                            "but got '}' (while parsing a flow sequence started at "
                                                            "line 3, column 18)"),
    ("base:\n  optim:\n    betas: &b [0.9, *b]\n", "base.optim.betas[1]: contains itself (a recursive YAML alias"),
    ("- name: x\n", "the top level must be a mapping, got list"),
])
def test_yaml_problems_are_one_line(tmp_path, text, expected):
    assert expected in bad_text(tmp_path, text)


def test_a_directory_is_not_a_spec(tmp_path):
    with pytest.raises(SpecError, match="is a directory, not a YAML file"):
        load_spec(str(tmp_path))


@pytest.mark.parametrize("overrides, expected", [
    (["optim.=1"], "override 'optim.=1': optim.: empty part in the dotted key"),
    (["channels_last=1"], "channels_last: expected true or false, got 1"),
    (["epochs=true"], "epochs: expected an integer, got True"),
    (["optim.lr=yes"], "optim.lr: expected a number, got True"),
])
def test_config_override_holes(overrides, expected):
    assert expected in config_error(overrides=overrides)


def test_numeric_strings_are_numbers_for_integers_too():
    # YAML 1.1 reads 1e3 as a string: float fields always took it, integer fields now do as well.
    cfg = TrainConfig.from_dict({"epochs": "1e1"}, ["optim.lr=1e-2", "batch_size=1e2"])
    assert (cfg.epochs, cfg.optim.lr, cfg.batch_size) == (10, 0.01, 100)


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        TrainConfig.from_yaml(str(path))
