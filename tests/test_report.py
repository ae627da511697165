"""Reports: source-shaped tables when the grid keys fit, generic otherwise; seeds as mean ± std; files
and plots. Trials are fabricated in an in-memory Optuna study (nothing trains)."""
from __future__ import annotations

import math

import optuna
import pandas as pd
import pytest
from conftest import TINY_BASE
from optuna.distributions import CategoricalDistribution

from sweeper import study as st
from sweeper.report import tables, trials_frame, write_report
from sweeper.spec import StudySpec, encode


def fabricate(grid: dict, seeds: list[int], figures) -> tuple[optuna.Study, StudySpec]:
    """A study holding one COMPLETE trial per grid point; `figures(point)` gives its summary."""
    spec = StudySpec.from_dict({"name": "fab", "kind": "grid", "base": TINY_BASE, "grid": grid, "seeds": seeds})
    study = optuna.create_study(direction="maximize")
    space = spec.grid_space()
    for grid_id, point in enumerate(spec.points()):
        summary = figures(point)
        status = summary.pop("status", "completed")
        study.add_trial(optuna.trial.create_trial(
            params={k: encode(v) for k, v in point.items()},
            distributions={k: CategoricalDistribution(space[k]) for k in point},
            value=-math.inf if status == "diverged" else summary.get("final_eval_acc", 0.0),
            user_attrs={st.T_RESULT: {"status": status, "summary": summary, "curves": {
                "epoch": [1, 2], "eval_acc": [summary.get("final_eval_acc", 0) / 2, summary.get("final_eval_acc", 0)]}}},
            system_attrs={"grid_id": grid_id}))
    return study, spec


def test_optimizer_x_batch_size_like_table_2():
    presets = [{"name": "sgdm", "lr": 1e-3}, {"name": "lamb", "lr": 5e-4, "weight_decay": 0.1}]

    def figures(p):
        if p["optim"]["name"] == "sgdm" and p["batch_size"] == 64:
            return {"status": "diverged"}
        return {"final_eval_acc": 40.0 + p["seed"] + (p["batch_size"] == 64), "final_eval_loss": 2.0}

    study, spec = fabricate({"optim": presets, "batch_size": [32, 64]}, [0, 1], figures)
    t = tables(trials_frame(study, spec), spec)["optimizer_x_batch"]
    assert list(t.columns) == ["B=32", "B=64"]
    assert list(t.index) == ["sgdm", "lamb"]
    assert t.loc["lamb", "B=32"] == "40.50 ± 0.71" and t.loc["lamb", "B=64"] == "41.50 ± 0.71"
    assert t.loc["sgdm", "B=64"] == "diverged"
    summary = tables(trials_frame(study, spec), spec)["summary"]
    assert len(summary) == 4 and summary["seeds"].tolist() == [2, 2, 2, 2]


def test_j_x_k_and_time_like_tables_3_and_4():
    def figures(p):
        k, j = p["distributed.workers"], p["distributed.local_steps"]
        return {"final_eval_acc": 50.0 - k / 10 + j / 100, "final_eval_loss": 1.9,
                "compute_time": 1000.0 + j, "comm_time_measured": 40.0 / j, "comm_time_modeled": 4.0 / j}

    grid = {"distributed.algorithm": ["local"], "distributed.workers": [2, 4, 8], "distributed.local_steps": [4, 64]}
    study, spec = fabricate(grid, [0], figures)
    shaped = tables(trials_frame(study, spec), spec)
    jk = shaped["j_x_k"]
    assert list(jk.columns) == ["K=2", "K=4", "K=8"]
    assert jk.index.get_level_values(-1).tolist() == [4, 64]
    assert jk.iloc[0, 0] == "49.84"  # one seed: no ± part
    time_table = shaped["k_j_time"]
    assert list(time_table.index)[:2] == ["K=2 J=4", "K=2 J=64"]  # the constant algorithm key is left out
    assert time_table.loc["K=2 J=64", "Communication time [s]"] == "0.62"
    assert list(time_table.columns) == ["Computation time [s]", "Communication time [s]",
                                        "Modeled communication time [s]"]


def test_slowmo_presets_and_alpha_sweep_like_tables_5_and_6():
    rows = [{"workers": 1, "local_steps": 1, "slowmo": {"alpha": 1.0, "beta": 0.0}},
            {"workers": 4, "local_steps": 16, "slowmo": {"alpha": 0.75, "beta": 0.2}}]
    study, spec = fabricate({"distributed": [{"algorithm": "local", **r} for r in rows]}, [0],
                            lambda p: {"final_eval_acc": 51.0, "final_eval_loss": 1.95, "compute_time": 3600.0,
                                       "comm_time_measured": 10.0})
    slowmo = tables(trials_frame(study, spec), spec)["slowmo"]
    assert list(slowmo.index) == ["K=1 J=1 alpha=1.0 beta=0.0", "K=4 J=16 alpha=0.75 beta=0.2"]
    assert slowmo.loc["K=4 J=16 alpha=0.75 beta=0.2", "Eval loss"] == "1.9500"

    study, spec = fabricate({"distributed.dynamic.alpha": [100, 1000]}, [0, 1],
                            lambda p: {"final_eval_acc": 51.0 + p["seed"], "comm_time_measured": 1000 / p[
                                "distributed.dynamic.alpha"], "compute_time": 3500.0})
    alpha = tables(trials_frame(study, spec), spec)["alpha_sweep"]
    assert list(alpha.index) == ["alpha=100", "alpha=1000"]
    assert alpha.loc["alpha=1000", "Communication time [s]"] == "1.00 ± 0.00"
    assert alpha.loc["alpha=100", "Eval accuracy [%]"] == "51.50 ± 0.71"


@pytest.mark.parametrize("fmt", ["md", "csv"])
def test_write_report_files_and_plots(tmp_path, fmt):
    study, spec = fabricate({"distributed.workers": [2, 4], "distributed.local_steps": [4, 8],
                             "distributed.algorithm": ["local"]}, [0, 1],
                            lambda p: {"final_eval_acc": 50.0 + p["seed"], "final_eval_loss": 2.0,
                                       "comm_time_measured": 1.0})
    paths = write_report(study, spec, tmp_path, fmt)
    names = {p.name for p in paths}
    assert {"curves.png", "heatmap_k_j.png"} <= names
    if fmt == "md":
        text = (tmp_path / "report.md").read_text()
        assert "## j_x_k" in text and "K=2" in text and "## k_j_time" in text
        assert "50.50 ± 0.71" in text
    else:
        assert {"summary.csv", "j_x_k.csv", "trials.csv"} <= names
        assert len(pd.read_csv(tmp_path / "trials.csv")) == 8
    assert all(p.stat().st_size > 0 for p in paths)
