"""Reports: source-shaped tables when the grid keys fit, generic otherwise; seeds as mean ± std; files
and plots. Trials are fabricated in an in-memory Optuna study (nothing trains)."""
from __future__ import annotations

import math
import re
import warnings

import matplotlib
import matplotlib.pyplot as plt
import optuna
import pandas as pd
import pytest
from conftest import TINY_BASE
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from sweeper import study as st
from sweeper.report import (batch_figure, curves_figure, fmt, heatmap_figure, parallel_plot, tables, trials_frame,
                            tune_plots, varied, write_report)
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
            user_attrs={st.T_RESULT: {"status": status, "summary": summary, "curves": curves_to(summary)}},
            system_attrs={"grid_id": grid_id}))
    return study, spec


def curves_to(summary: dict) -> dict:
    """Two epochs ending at the summary's final accuracy and loss (halfway and twice as high before)."""
    acc, loss = summary.get("final_eval_acc", 0), summary.get("final_eval_loss", 1.0)
    return {"epoch": [1, 2], "eval_acc": [acc / 2, acc], "eval_loss": [2 * loss, loss]}


def tune_study(values: list[tuple[float, int, float]]) -> tuple[optuna.Study, StudySpec]:
    """A tune study over optim.lr (log) and batch_size holding one COMPLETE trial per (lr, batch, acc)."""
    spec = StudySpec.from_dict({"name": "fab-tune", "kind": "tune", "base": TINY_BASE, "budget": 8, "search": {
        "optim.lr": {"low": 1e-4, "high": 1e-1, "log": True}, "batch_size": {"low": 16, "high": 128, "log": True}}})
    study = optuna.create_study(direction="maximize")
    dists = {"optim.lr": FloatDistribution(1e-4, 1e-1, log=True), "batch_size": IntDistribution(16, 128, log=True)}
    for lr, batch, acc in values:
        summary = {"final_eval_acc": acc, "final_eval_loss": 1.5}
        study.add_trial(optuna.trial.create_trial(
            params={"optim.lr": lr, "batch_size": batch}, distributions=dists, value=acc,
            user_attrs={st.T_RESULT: {"status": "completed", "summary": summary, "curves": curves_to(summary)}}))
    return study, spec


def links(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]+\]\(([^)]+)\)", report)


def k_j_study(seeds=(0, 1)):
    return fabricate({"distributed.workers": [2, 4], "distributed.local_steps": [4, 8],
                      "distributed.algorithm": ["local"]}, list(seeds),
                     lambda p: {"final_eval_acc": 50.0 + p["seed"], "final_eval_loss": 2.0 + p["seed"] / 10,
                                "comm_time_measured": 1.0})


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
    assert time_table.loc["K=2 J=64", "Communication time [s]"] == "0.625"  # times under 1 s: 3 significant digits
    assert list(time_table.columns) == ["Computation time [s]", "Communication time [s]",
                                        "Modeled communication time [s]"]


def test_slowmo_presets_and_alpha_sweep_like_tables_5_and_6():
    rows = [{"workers": 1, "local_steps": 1, "slowmo": {"alpha": 1.0, "beta": 0.0}},
            {"workers": 4, "local_steps": 16, "slowmo": {"alpha": 0.75, "beta": 0.2}}]
    study, spec = fabricate({"distributed": [{"algorithm": "local", **r} for r in rows]}, [0],
                            lambda p: {"final_eval_acc": 51.0, "final_eval_loss": 1.95, "compute_time": 3600.0,
                                       "comm_time_measured": 10.0})
    slowmo = tables(trials_frame(study, spec), spec)["slowmo"]
    assert list(slowmo.index) == ["K=1 J=1 alpha=1 beta=0", "K=4 J=16 alpha=0.75 beta=0.2"]
    assert slowmo.loc["K=4 J=16 alpha=0.75 beta=0.2", "Eval loss"] == "1.9500"

    # DiLoCo, Local SGD and SlowMo as sub-configs: the algorithm differs too, so a row is the whole
    # sub-config (slowmo alone would pool DiLoCo and Local SGD, both without SlowMo, into one row)
    outer = [{"algorithm": "diloco"}, {"algorithm": "local"}, {"algorithm": "local", "slowmo": {"alpha": 1.0, "beta": 0.5}}]
    study, spec = fabricate({"distributed": outer}, [0], lambda p: {
        "final_eval_acc": {"diloco": 60.0}.get(p["distributed"]["algorithm"], 50.0 + len(p["distributed"])),
        "comm_rounds": 58.0, "comm_bytes": 1.5e7, "comm_time_modeled": 0.0141})
    shaped = tables(trials_frame(study, spec), spec)
    assert list(shaped["slowmo"]["Eval accuracy [%]"]) == ["60.00", "51.00", "52.00"]
    assert shaped["slowmo"].index[0].startswith("distributed=algorithm=diloco")
    assert list(shaped["communication"]["Communication rounds"]) == ["58", "58", "58"]  # at equal communication
    assert list(shaped["communication"]["Modeled communication time [s]"]) == ["0.0141"] * 3

    study, spec = fabricate({"distributed.dynamic.alpha": [100, 1000]}, [0, 1],
                            lambda p: {"final_eval_acc": 51.0 + p["seed"], "comm_time_measured": 1000 / p[
                                "distributed.dynamic.alpha"], "compute_time": 3500.0})
    alpha = tables(trials_frame(study, spec), spec)["alpha_sweep"]
    assert list(alpha.index) == ["alpha=100", "alpha=1000"]
    assert alpha.loc["alpha=1000", "Communication time [s]"] == "1.0 ± 0.0"
    assert alpha.loc["alpha=100", "Eval accuracy [%]"] == "51.50 ± 0.71"


@pytest.mark.parametrize("fmt", ["md", "csv"])
def test_write_report_files_and_plots(tmp_path, fmt):
    study, spec = k_j_study()
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


def test_report_md_links_every_plot_by_a_relative_path_that_exists(tmp_path):
    study, spec = k_j_study()
    paths = write_report(study, spec, tmp_path, "md")
    report = (tmp_path / "report.md").read_text()
    linked = links(report.split("## Plots", 1)[1])
    assert {"parallel_coordinates.png", "curves.png", "heatmap_k_j.png"} <= set(linked)
    assert all((tmp_path / name).is_file() and "/" not in name for name in linked)
    assert sorted(linked) == sorted(p.name for p in paths if p.suffix == ".png")  # every plot, once


def test_curves_show_accuracy_and_loss_per_epoch_with_rounded_labels():
    study, spec = fabricate({"optim.lr": [0.012520653814999465, 0.1]}, [0, 1],
                            lambda p: {"final_eval_acc": 50.0 + p["seed"], "final_eval_loss": 2.0 + p["seed"]})
    fig = curves_figure(study, spec, trials_frame(study, spec))
    acc, loss = fig.axes
    assert (acc.get_ylabel(), loss.get_ylabel()) == ("Eval accuracy [%]", "Eval loss")
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["lr=0.0125", "lr=0.1"]
    assert [line.get_xdata().tolist() for line in loss.lines] == [[1, 2], [1, 2]]  # epochs from 1
    assert loss.lines[0].get_ydata().tolist() == [5.0, 2.5]  # the mean over seeds 0 and 1
    assert acc.lines[0].get_ydata().tolist() == [25.25, 50.5]
    assert all(float(t).is_integer() for ax in (acc, loss) for t in ax.get_xticks())


def test_one_format_per_metric_in_every_table(tmp_path):
    assert (fmt("final_eval_acc", 51.4666), fmt("eval_loss", 1.95), fmt("comm_time_measured", 1234.56)) == \
        ("51.47", "1.9500", "1234.6")
    assert (fmt("comm_rounds", 12.0), fmt("optim.lr", 0.012520653), fmt("eval_acc", None)) == ("12", "0.01252", "-")
    presets = [{"name": "sgdm", "lr": 1e-3}, {"name": "lamb", "lr": 5e-4}]
    study, spec = fabricate({"optim": presets, "batch_size": [32, 64]}, [0, 1],
                            lambda p: {"final_eval_acc": 40.0 + p["seed"], "final_eval_loss": 2.0})
    write_report(study, spec, tmp_path, "md")
    summary, shaped = (tmp_path / "summary.md").read_text(), (tmp_path / "optimizer_x_batch.md").read_text()
    assert "objective: final eval accuracy [%] (maximized)" in summary
    assert "40.50 ± 0.71" in summary and "40.50 ± 0.71" in shaped and "2.0000 ± 0.0000" in summary
    study, spec = k_j_study(seeds=[0])
    write_report(study, spec, tmp_path, "md")
    assert "| 50.00 " in (tmp_path / "j_x_k.md").read_text()  # one seed: as written, not parsed back into 50
    assert "2.0000" in (tmp_path / "summary.md").read_text()
    heatmap = heatmap_figure(trials_frame(study, spec), varied(trials_frame(study, spec), spec))
    assert {t.get_text() for t in heatmap.axes[0].texts} == {"50.00"}


def test_batch_size_axis_is_log2_with_the_batch_sizes_as_ticks():
    study, spec = fabricate({"optim": [{"name": "sgdm", "lr": 0.05}], "batch_size": [32, 64, 256]}, [0],
                            lambda p: {"final_eval_acc": 40.0})
    frame = trials_frame(study, spec)
    ax = batch_figure(frame, varied(frame, spec)).axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "64", "256"]


def test_tune_study_plots_history_slices_and_importances(tmp_path):
    study, spec = tune_study([(1e-3, 32, 40.0), (1e-2, 64, 45.0), (3e-2, 16, 47.0), (1e-4, 128, 30.0)])
    style = dict(matplotlib.rcParams)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_report(study, spec, tmp_path, "md")
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    assert dict(matplotlib.rcParams) == style and plt.get_fignums() == []  # Optuna's pyplot state stays local
    linked = links((tmp_path / "report.md").read_text())
    assert {"optimization_history.png", "slice.png", "param_importances.png", "parallel_coordinates.png"} <= set(linked)
    assert all((tmp_path / name).stat().st_size > 0 for name in linked)
    assert "plots left out" not in (tmp_path / "report.md").read_text()


def test_a_study_without_finished_trials_has_a_report_without_plots(tmp_path):
    spec = StudySpec.from_dict({"name": "empty", "kind": "grid", "base": TINY_BASE, "grid": {"optim.lr": [0.1, 0.2]}})
    paths = write_report(optuna.create_study(), spec, tmp_path, "md")
    assert [p.name for p in paths] == ["report.md", "summary.md"]
    assert "0 finished trials" in (tmp_path / "report.md").read_text()


def test_a_plot_optuna_cannot_draw_is_left_out_with_the_reason(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        plt.subplots()
        raise RuntimeError("boom")

    monkeypatch.setattr(optuna.visualization.matplotlib, "plot_param_importances", broken)
    study, spec = tune_study([(1e-3, 32, 40.0), (1e-2, 64, 45.0)])
    names = {p.name for p in write_report(study, spec, tmp_path, "md")}
    assert {"slice.png", "optimization_history.png"} <= names and "param_importances.png" not in names
    assert "Parameter importances left out: Optuna could not draw it (RuntimeError: boom)." in \
        (tmp_path / "report.md").read_text()
    assert plt.get_fignums() == []


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # drawn here, not by the report
def test_tune_batch_size_axes_are_log2_with_batch_sizes_as_ticks():
    study, spec = tune_study([(1e-3, 32, 40.0), (1e-2, 64, 45.0), (3e-2, 16, 47.0), (1e-4, 128, 30.0)])
    draws = {name: draw for name, _, draw in tune_plots(study, spec)[0] + parallel_plot(study, spec)}
    slices, parallel = draws["slice.png"](), draws["parallel_coordinates.png"]()
    try:
        batch = next(ax for ax in slices.flat if ax.get_xlabel() == "batch_size")
        assert batch.xaxis.get_transform().base == 2
        texts = [t.get_text() for t in batch.get_xticklabels()]  # powers of two, as plain numbers
        assert {"16", "32", "64", "128"} <= set(texts) and all(t.isdigit() for t in texts)
        axis = next(ax for ax in parallel.figure.axes if "64" in [t.get_text() for t in ax.get_yticklabels()])
        assert axis.yaxis.get_transform().base == 2
    finally:
        plt.close(slices.flat[0].figure)
        plt.close(parallel.figure)


def test_tune_plots_left_out_with_the_reason_for_one_trial(tmp_path):
    study, spec = tune_study([(1e-3, 32, 40.0)])
    write_report(study, spec, tmp_path, "md")
    report = (tmp_path / "report.md").read_text()
    assert "plots left out: they need 2 complete trials with a finite objective, the study has 1." in report
    assert not {"optimization_history.png", "slice.png", "param_importances.png",
                "parallel_coordinates.png"} & {p.name for p in tmp_path.iterdir()}
    study, spec = tune_study([(1e-3, 32, 40.0), (1e-3, 32, 41.0)])
    names = {p.name for p in write_report(study, spec, tmp_path / "same", "md")}
    assert "optimization_history.png" in names and not {"slice.png", "param_importances.png"} & names
    assert "left out: no searched parameter varies" in (tmp_path / "same" / "report.md").read_text()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # drawn here, not by the report
def test_parallel_coordinates_for_two_varied_keys_labels_sub_configs(tmp_path):
    presets = [{"name": "sgdm", "lr": 1e-3}, {"name": "lamb", "lr": 5e-4}]
    study, spec = fabricate({"optim": presets, "batch_size": [32, 64]}, [0],
                            lambda p: {"final_eval_acc": 40.0 + (p["batch_size"] == 64)})
    assert "parallel_coordinates.png" in {p.name for p in write_report(study, spec, tmp_path, "md")}
    [(_, _, draw)] = parallel_plot(study, spec)
    ax = draw()
    try:
        ticks = {t.get_text() for a in ax.figure.axes for t in a.get_yticklabels()}
        assert {"sgdm(lr=0.001)", "lamb(lr=0.0005)"} <= ticks and not any(t.startswith("{") for t in ticks)
        assert ax.get_xticklabels()[0].get_text() == "final eval accuracy [%]"
        colorbar = next(a for a in ax.figure.axes if a.get_ylabel() == "final eval accuracy [%]")
        labels_end = max(t.get_window_extent().x1 for a in ax.figure.axes if a is not colorbar
                         for t in a.get_yticklabels())
        assert colorbar.get_window_extent().x0 > labels_end  # clear of the long sub-config labels
    finally:
        plt.close(ax.figure)
    study, spec = fabricate({"batch_size": [32, 64]}, [0, 1], lambda p: {"final_eval_acc": 40.0})
    assert parallel_plot(study, spec) == []  # one varied key


def test_the_local_steps_trajectory_is_drawn_only_when_it_changes():
    """Dynamic J (Poiatti et al., Table 6): J_t per epoch for each alpha, mean over seeds; a constant J
    draws nothing."""
    from sweeper.report import local_steps_figure

    def study_with(trajectory):
        study, spec = fabricate({"distributed.dynamic.alpha": [100, 4500]}, [0, 1], lambda p: {"final_eval_acc": 50.0})
        redone = optuna.create_study(direction="maximize")
        for t in study.trials:
            curves = {**t.user_attrs[st.T_RESULT]["curves"],
                      "local_steps_mean": trajectory(t.params["distributed.dynamic.alpha"], t.params["seed"])}
            redone.add_trial(optuna.trial.create_trial(
                params=t.params, distributions=t.distributions, value=t.value, system_attrs=t.system_attrs,
                user_attrs={st.T_RESULT: {**t.user_attrs[st.T_RESULT], "curves": curves}}))
        return redone, spec

    study, spec = study_with(lambda alpha, seed: [4.0 + seed, alpha / 100 + seed])
    fig = local_steps_figure(study, spec, trials_frame(study, spec))
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
    assert lines == {"alpha=100": [4.5, 1.5], "alpha=4500": [4.5, 45.5]}
    study, spec = study_with(lambda alpha, seed: [16.0, 15.2 + alpha / 4500])  # a constant J, rounded per epoch
    assert local_steps_figure(study, spec, trials_frame(study, spec)) is None


def test_a_trials_stored_curves_carry_its_averaging_period_when_the_engine_reports_it():
    from sweeper.run import curves
    from trainers.results import EpochReport

    def report(epoch, **extra):
        return EpochReport(epoch, 1.0, 50.0, 1.0, 50.0, 0.1, 1.0, 0.1, 100.0, extra)

    k_worker = curves([report(1, local_steps_mean=4.0, local_steps=6.0), report(2, local_steps_mean=9.5, local_steps=12.0)])
    assert k_worker["local_steps_mean"] == [4.0, 9.5] and k_worker["local_steps"] == [6.0, 12.0]
    assert "local_steps_mean" not in curves([report(1), report(2)])  # one model: no period
