"""Study specs: every error names the file, the key and the reason; every shipped spec validates."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY_BASE, write_spec

from sweeper.spec import SpecError, StudySpec, changed_keys, encode, load_spec

STUDIES = sorted((ROOT / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_specs_validate(path):
    spec = load_spec(str(path))  # builds every grid point / search corner as a TrainConfig; trains nothing
    assert spec.name == path.stem
    if spec.kind == "grid":
        assert len(spec.points()) >= 2
    else:
        assert spec.budget >= 1


def test_studies_cover_the_sources():
    names = {p.stem for p in STUDIES}
    assert "quickstart" in names
    algorithms = set()
    for path in STUDIES:
        spec = load_spec(str(path))
        for point in (spec.points() if spec.kind == "grid" else [{}]):
            algorithms.add(spec.config(point).distributed.algorithm)
    assert {"centralized", "minibatch", "local", "post-local", "dynamic-local", "adaptive-local",
            "decentralized"} <= algorithms


def errors_of(tmp_path: Path, **fields) -> str:
    path = write_spec(tmp_path / "bad.yaml", "bad", **fields)
    with pytest.raises(SpecError) as info:
        load_spec(str(path))
    message = str(info.value)
    assert message.startswith(str(path)), message  # the file comes first
    return message


def test_grid_value_error_names_key_index_and_reason(tmp_path):
    msg = errors_of(tmp_path, grid={"optim.lr": [0.1, -1.0]})
    assert "grid.optim.lr[1]" in msg and "must be positive" in msg


def test_unknown_dotted_key_suggests_the_right_one(tmp_path):
    msg = errors_of(tmp_path, grid={"optim.lrr": [0.1]})
    assert "optim.lrr" in msg and "did you mean optim.lr" in msg


def test_sub_config_values_are_validated(tmp_path):
    msg = errors_of(tmp_path, grid={"optim": [{"name": "sgdm"}, {"name": "adamm", "lr": 1e-3}]})
    assert "grid.optim[1]" in msg and "adamm" in msg and "did you mean 'adamw'" in msg


def test_combination_error_names_the_point(tmp_path):
    # Each value is fine alone; the combination workers=4 x algorithm=centralized is not.
    msg = errors_of(tmp_path, grid={"distributed.workers": [1, 4], "distributed.algorithm": ["centralized", "local"]})
    assert "grid point" in msg and "distributed.workers=4" in msg and "distributed.algorithm=centralized" in msg


@pytest.mark.parametrize("fields, expected", [
    ({"kind": "grdi"}, "kind: unknown value 'grdi'"),
    ({"seedz": [1]}, "seedz: unknown key (did you mean seeds?)"),
    ({"base": {**TINY_BASE, "epochs": 0}}, "base.epochs: must be positive"),
    ({"objective": {"metric": "eval_accuracy"}}, "objective.metric: unknown metric 'eval_accuracy' (did you mean eval_acc?)"),
    ({"objective": {"direction": "up"}}, "objective.direction: unknown value 'up'"),
    ({"name": "a b"}, "name: 'a b' must be"),
    ({"seeds": [0, 0]}, "seeds: lists a seed twice"),
    ({"grid": {"optim.lr": [0.1, 0.1]}}, "grid.optim.lr: lists a value twice"),
    ({"grid": {"optim.lr": []}}, "grid.optim.lr: expected a non-empty list"),
    ({"budget": 3}, "budget: a grid study runs every point once"),
    ({"kind": "tune", "grid": {}, "search": {"optim.lr": {"low": 1e-4, "high": 1e-1, "log": True}}},
     "budget: a tune study needs budget"),
    ({"kind": "tune", "grid": {}, "budget": 4, "seeds": [0, 1], "search": {"optim.lr": {"low": 0.1, "high": 1.0}}},
     "seeds: a tune study trains one seed per trial"),
    ({"kind": "tune", "grid": {}, "budget": 4, "search": {"optim.lr": {"low": 1.0, "high": 0.1}}},
     "search.optim.lr: low (1.0) must be below high (0.1)"),
    ({"kind": "tune", "grid": {}, "budget": 4, "search": {"optim.lr": {"low": 0.0, "high": 0.1, "log": True}}},
     "search.optim.lr.low: a log range needs low > 0"),
    ({"kind": "tune", "grid": {}, "budget": 4, "search": {"optim.momentum": {"low": 0.5, "high": 1.5}}},
     "search.optim.momentum value 1.5: optim.momentum: must lie in [0, 1)"),
    ({"kind": "tune", "grid": {}, "budget": 4, "search": {"optim.name": {"choices": ["sgdm", "lbfgs"]}}},
     "search.optim.name value lbfgs: optim.name: unknown value 'lbfgs'"),
])
def test_spec_errors(tmp_path, fields, expected):
    assert expected in errors_of(tmp_path, **fields)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml: file not found"):
        load_spec(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"):
        load_spec(str(bad))


def test_points_seed_outermost_and_sub_configs_round_trip(tmp_path):
    lars = {"name": "lars", "lr": 0.25, "weight_decay": 4e-4}
    path = write_spec(tmp_path / "s.yaml", "s", grid={"optim": [{"name": "sgdm"}, lars], "batch_size": [32, 64]},
                      seeds=[0, 1])
    spec = load_spec(str(path))
    points = spec.points()
    assert len(points) == 8 and [p["seed"] for p in points] == [0] * 4 + [1] * 4
    space = spec.grid_space()
    assert all(isinstance(v, (str, int, float, bool)) or v is None for vs in space.values() for v in vs)
    assert spec.decode("optim", encode(lars)) == lars
    cfg = spec.config(points[2])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.batch_size) == ("lars", 0.25, 0.9, 32)
    assert spec.label(points[2]) == "optim=lars(lr=0.25,weight_decay=0.0004) batch_size=32 seed=0"


def test_identity_ignores_budget_but_not_the_grid(tmp_path):
    raw = yaml.safe_load(write_spec(tmp_path / "a.yaml", "a").read_text())
    a = StudySpec.from_dict(raw)
    b = StudySpec.from_dict({**raw, "description": "changed"})
    c = StudySpec.from_dict({**raw, "grid": {"optim.lr": [0.05, 0.2]}})
    assert changed_keys(a, b) == []
    assert changed_keys(a, c) == ["grid.optim.lr"]
