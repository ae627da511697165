"""Study reports: pandas tables shaped like Poiatti et al.'s tables where the grid keys fit, a generic
table always, plots, written as Markdown or CSV and logged to the study's parent MLflow run.

Everything is read from Optuna (trial params, and the user attrs a trial stores when it finishes: final
figures, per-run time/communication totals, per-epoch curves), so a report needs no tracking server.
Seeds are aggregated as mean ± std; a diverged trial is shown as such, never averaged in. Every figure
is written by `fmt`, one format per metric.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from trainers.results import BY_NAME, METRICS

from .figures import fmt, fmt_spread
from .spec import SEED_KEY, StudySpec, value_label

__all__ = ["aggregate", "fmt", "log_report", "objective_title", "tables", "trials_frame", "write_report"]

BATCH, K, J = "batch_size", "distributed.workers", "distributed.local_steps"
SLOWMO = ("distributed.slowmo", "distributed.slowmo.alpha", "distributed.slowmo.beta")
ALPHA = "distributed.dynamic.alpha"
ACC, LOSS = "final_eval_acc", "final_eval_loss"
COMPUTE, COMM, COMM_MODELED = "compute_time", "comm_time_measured", "comm_time_modeled"
ROUNDS, BYTES, WALL_MODELED = "comm_rounds", "comm_bytes", "wall_time_modeled"
# Column and axis titles, from the metrics' declaration (a trial's final figures as their metric's).
NAMES = {**{m.name: m.title for m in METRICS}, **{f"final_{m.name}": m.title for m in METRICS}}


def objective_title(spec: StudySpec) -> str:
    """What a trial's value is, in the metrics' words: `final eval accuracy [%]`, `total communication
    time [s]` (an additive metric's objective is its run total)."""
    obj = spec.objective
    metric = BY_NAME.get(obj.metric)
    if metric is None:  # a summary figure (total_time, best_eval_acc): the value itself
        return obj.metric
    return f"{'total' if metric.additive else obj.mode} {metric.title[0].lower()}{metric.title[1:]}"


def value_text(value: Any) -> str:
    """A parameter value in a label: floats to 3 significant digits (0.0125, 1.5e-05), whole ones whole."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}" if value.is_integer() else f"{value:.3g}"
    return str(value)


# --------------------------------------------------------------------------------------------------
# Data


def trials_frame(study, spec: StudySpec) -> pd.DataFrame:
    """One row per finished (COMPLETE or PRUNED) trial: its point (labels), seed, state, value and the
    figures it stored."""
    from optuna.trial import TrialState

    from .study import point_of, status_of, summary_of

    from trainers.config import flatten

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        point = point_of(t, spec)
        row: dict[str, Any] = {key: _label(point.get(key)) for key in spec.dims if key != SEED_KEY}
        for key in spec.dims:  # a sub-config value also gives one column per key it sets
            if isinstance(point.get(key), dict):
                row.update({f"{key}.{k}": _label(v) for k, v in flatten(point[key]).items() if f"{key}.{k}" not in row})
        row.update(seed=point.get(SEED_KEY), trial=t.number, state=t.state.name,
                   status=status_of(t), value=t.value)
        row.update({k: v for k, v in summary_of(t).items() if k not in ("status",)})
        rows.append(row)
    return pd.DataFrame(rows)


def _label(value: Any) -> Any:
    if value is None:
        return "none"
    return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) else value_label(value)


def aggregate(frame: pd.DataFrame, keys: list[str], cols: list[str]) -> pd.DataFrame:
    """Mean and std over seeds of `cols` for each point of `keys` (diverged trials left out and counted)."""
    out = []
    for point, group in frame.groupby(keys, sort=False, dropna=False) if keys else [((), frame)]:
        point = point if isinstance(point, tuple) else (point,)
        ok = group[group["status"] != "diverged"]
        row = dict(zip(keys, point))
        row.update(n=len(group), diverged=int((group["status"] == "diverged").sum()))
        for col in cols:
            values = pd.to_numeric(ok[col], errors="coerce").dropna() if col in ok else pd.Series(dtype=float)
            row[f"{col}_mean"] = values.mean() if len(values) else math.nan
            row[f"{col}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        out.append(row)
    return pd.DataFrame(out)


def cell(row: pd.Series, col: str, metric: str | None = None) -> str:
    """`51.47 ± 0.32`, `diverged`, or `-` (the source's mark for a configuration that did not train);
    written as `metric`'s figures (`col` itself unless given)."""
    mean, std = row.get(f"{col}_mean", math.nan), row.get(f"{col}_std", math.nan)
    if row["diverged"] == row["n"]:
        return "diverged"
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    metric = metric or col
    text = fmt_spread(metric, mean, std)
    return text + (f" ({row['diverged']}/{row['n']} diverged)" if row["diverged"] else "")


# --------------------------------------------------------------------------------------------------
# Tables


def varied(frame: pd.DataFrame, spec: StudySpec) -> list[str]:
    """The keys a study varies: its dims, and the keys its sub-config values set (`optim` presets give
    optim.name, optim.lr, ...), so a grid over whole sub-configs still fits the source-shaped tables."""
    dims = [k for k in spec.dims if k != SEED_KEY]
    return dims + [c for c in frame.columns if any(c.startswith(f"{d}.") for d in dims) and c not in dims]


def optimizer_key(frame: pd.DataFrame, keys: list[str]) -> str | None:
    """optim.name when it tells the presets apart (a short row label), else the preset itself."""
    if "optim.name" in keys and ("optim" not in keys or frame["optim.name"].nunique() == frame["optim"].nunique()):
        return "optim.name"
    return "optim" if "optim" in keys else None


def tables(frame: pd.DataFrame, spec: StudySpec) -> dict[str, pd.DataFrame]:
    """Every table that fits the study: `summary` always; source-shaped ones when their keys are varied."""
    dims = [k for k in spec.dims if k != SEED_KEY]
    if not frame.empty:  # a pruned trial stopped early: its figures are not comparable
        frame = frame[frame["state"] == "COMPLETE"]
    out = {"summary": summary_table(frame, spec, dims)}
    if frame.empty:
        return out
    keys = varied(frame, spec)
    opt = optimizer_key(frame, keys)
    if opt and BATCH in keys:
        out["optimizer_x_batch"] = pivot(frame, dims, rows=opt, cols=BATCH, value=ACC)  # Table 2
    if K in keys and J in keys:
        out["j_x_k"] = pivot(frame, dims, rows=J, cols=K, value=ACC)  # Table 3
        if COMPUTE in frame or COMM in frame:
            out["k_j_time"] = listing(frame, dims, [K, J], [COMPUTE, COMM, COMM_MODELED])  # Table 4
    slowmo = ["distributed.slowmo"] if "distributed.slowmo" in dims else [k for k in SLOWMO[1:] if k in keys]
    if slowmo:
        shown = [k for k in (K, J) if k in keys] + slowmo
        # Keys read out of a sub-config (`distributed: [{algorithm: diloco}, {..., slowmo: ..}]`) stand for
        # the whole of it when it also varies in another key: rows differ in more than K, J and SlowMo.
        whole = [d for d in dims if any(k.startswith(f"{d}.") for k in shown) and any(
            c.startswith(f"{d}.") and c not in shown and not c.startswith(f"{d}.slowmo") and varies(frame, c)
            for c in keys)]
        shown = [k for k in shown if not any(k.startswith(f"{d}.") for d in whole)] + whole
        out["slowmo"] = listing(frame, dims, shown, [COMPUTE, COMM, COMM_MODELED, ACC, LOSS])  # Table 5
    if ROUNDS in frame and frame[ROUNDS].notna().any():  # K workers: what each point communicated (Jiang & Agrawal)
        shown = [d for d in dims if varies(frame, d)]
        if shown:
            out["communication"] = listing(frame, dims, shown, [ROUNDS, BYTES, COMM, COMM_MODELED, WALL_MODELED, ACC])
    if ALPHA in keys:
        out["alpha_sweep"] = listing(frame, dims, [ALPHA], [COMPUTE, COMM, COMM_MODELED, ACC, LOSS])  # Table 6
    return out


def others(frame: pd.DataFrame, dims: list[str], used: list[str]) -> list[str]:
    """The varied keys a table does not show as axes (they join its row index); a key with one value in
    the whole study says nothing and is left out."""
    return [d for d in dims if not any(u == d or u.startswith(f"{d}.") for u in used) and varies(frame, d)]


def varies(frame: pd.DataFrame, key: str) -> bool:
    return key in frame and frame[key].astype(str).nunique() > 1


def summary_table(frame: pd.DataFrame, spec: StudySpec, dims: list[str]) -> pd.DataFrame:
    """Generic: the varied keys as index, objective and accuracy/loss as mean ± std over seeds."""
    if frame.empty:
        return pd.DataFrame(columns=dims + ["objective"])
    column = f"objective: {objective_title(spec)} ({spec.objective.direction}d)"
    dims = [d for d in dims if varies(frame, d)] or dims
    agg = aggregate(frame.assign(objective=frame["value"]), dims, ["objective", ACC, LOSS])
    table = pd.DataFrame({k: agg[k] for k in dims})
    table[column] = [cell(r, "objective", spec.objective.metric) for _, r in agg.iterrows()]
    same = f"final_{spec.objective.metric}" if spec.objective.mode == "final" else None
    for col in (ACC, LOSS):
        if agg[f"{col}_mean"].notna().any() and col != same:  # not the objective's column twice
            table[NAMES[col]] = [cell(r, col) for _, r in agg.iterrows()]
    table["seeds"] = agg["n"]
    if spec.kind == "tune":  # many one-off points: best first
        order = agg["objective_mean"].sort_values(ascending=spec.objective.direction == "minimize").index
        table = table.loc[order]
    return table.set_index(dims) if dims else table


def pivot(frame: pd.DataFrame, dims: list[str], rows: str, cols: str, value: str) -> pd.DataFrame:
    """rows x cols of `value` (mean ± std); other varied keys join the row index."""
    extra = others(frame, dims, [rows, cols])
    agg = aggregate(frame, extra + [rows, cols], [value])
    agg["cell"] = [cell(r, value) for _, r in agg.iterrows()]
    table = agg.pivot_table(index=extra + [rows], columns=cols, values="cell", aggfunc="first", sort=False)
    table.columns = [f"{_short(cols)}={c}" for c in table.columns]
    table.index.names = [_short(k) for k in table.index.names]
    return table


def listing(frame: pd.DataFrame, dims: list[str], keys: list[str], cols: list[str]) -> pd.DataFrame:
    """One row per combination of `keys` (labelled like `K=2 J=4`), the figures in `cols` present."""
    extra = others(frame, dims, keys)
    present = [c for c in cols if c in frame and frame[c].notna().any()]
    agg = aggregate(frame, extra + keys, present)
    label = labels(agg, extra + keys)
    table = pd.DataFrame({NAMES.get(c, c): [cell(r, c) for _, r in agg.iterrows()]
                          for c in present}, index=pd.Index(label, name="combination"))
    return table


def labels(frame: pd.DataFrame, keys: list[str]) -> list[str]:
    """`K=2 J=4`, `lr=0.0125` per row (column by column: iterrows would turn the ints into floats)."""
    return [" ".join(f"{_short(k)}={value_text(v)}" for k, v in zip(keys, values))
            for values in zip(*(frame[k] for k in keys))]


def _short(key: str) -> str:
    return {K: "K", J: "J", ALPHA: "alpha", BATCH: "B", "optim.name": "optimizer"}.get(key, key.split(".")[-1])


# --------------------------------------------------------------------------------------------------
# Plots

Plot = tuple[str, Path]  # (title, PNG): report.md links it as ![title](name.png)
CURVES_SHOWN = 20  # points with a curve (a tune study's best ones)


def _figure(width: float = 6.0, height: float = 3.6, cols: int = 1):
    from matplotlib.figure import Figure  # the object API: no pyplot state, safe off the main thread

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, cols)


def plots(study, spec: StudySpec, frame: pd.DataFrame, out: Path) -> tuple[list[Plot], list[str]]:
    """Every plot that fits the study, and a line for each one left out saying why: parallel
    coordinates (the parent run's overview), eval accuracy and loss curves, the shaped plots whose keys
    the study varies (K x J heatmap, accuracy vs batch size, communication vs alpha), and a tune study's
    optimization history, slices and parameter importances."""
    if frame.empty:
        return [], []
    keys = varied(frame, spec)
    shown, notes = _optuna_plots(out, parallel_plot(study, spec))
    own = [("curves.png", "eval accuracy and loss per epoch (mean over seeds)", curves_figure(study, spec, frame)),
           ("heatmap_k_j.png", "eval accuracy over K x J", heatmap_figure(frame, keys)),
           ("accuracy_vs_batch.png", "eval accuracy vs batch size", batch_figure(frame, keys)),
           ("communication_vs_alpha.png", "communication vs alpha", alpha_figure(frame, keys)),
           ("local_steps.png", "local steps per averaging round, per epoch", local_steps_figure(study, spec, frame))]
    shown += [(title, _save(fig, out / name)) for name, title, fig in own if fig is not None]
    tune, left_out = tune_plots(study, spec)
    drawn, failed = _optuna_plots(out, tune)
    return shown + drawn, notes + left_out + failed


def curves_figure(study, spec: StudySpec, frame: pd.DataFrame):
    """Eval accuracy and eval loss per epoch side by side, one line per point (mean over its seeds;
    diverged trials left out), labelled with its varied keys."""
    from matplotlib.ticker import MaxNLocator

    from .study import curves_of

    dims = [k for k in spec.dims if k != SEED_KEY]
    named = [d for d in dims if varies(frame, d)] or dims  # the keys a line's label shows
    frame = frame[frame["status"] != "diverged"]
    if spec.kind == "tune":  # one point per trial: the best ones
        frame = frame.sort_values("value", ascending=spec.objective.direction == "minimize")
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    groups = frame.groupby(dims, sort=False, dropna=False) if dims else [((), frame)]
    lines = []  # (label, mean accuracy, mean loss), grouped by the exact values and labelled rounded
    for _, group in groups:
        found = [curves_of(by_number[n]) for n in group["trial"]]
        means = [_mean_curve(found, metric) for metric in ("eval_acc", "eval_loss")]
        if any(len(m) for m in means):
            lines.append((labels(group.head(1), named)[0] if named else "all", *means))
    if not lines:
        return None
    from matplotlib import colormaps

    fig, axes = _figure(11.0, 4.2, cols=2)
    shown = lines[:CURVES_SHOWN]
    colors = colormaps["tab10" if len(shown) <= 10 else "tab20"].colors  # no two curves of one color
    styles = ("-", "--")  # beyond 20 curves, a second line style
    for i, (label, *means) in enumerate(shown):
        for ax, mean in zip(axes, means):
            ax.plot(mean.index, mean.values, label=label, color=colors[i % len(colors)],
                    linestyle=styles[i // len(colors) % 2])
    for ax, metric in zip(axes, ("eval_acc", "eval_loss")):
        ax.set(xlabel="epoch", ylabel=NAMES[metric])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    shown_of = f" ({CURVES_SHOWN} best of {len(lines)})" if len(lines) > CURVES_SHOWN else ""
    fig.suptitle(f"{spec.name}: eval accuracy and loss (mean over seeds){shown_of}", fontsize=10)
    return fig


def _mean_curve(curves: list[dict], metric: str) -> pd.Series:
    """The per-epoch mean of `metric` over the trials that recorded it, indexed by epoch (from 1)."""
    series = [pd.Series(c[metric], index=c.get("epoch") or range(1, len(c[metric]) + 1), dtype=float)
              for c in curves if c.get(metric)]
    return pd.concat(series, axis=1).mean(axis=1) if series else pd.Series(dtype=float)


def local_steps_figure(study, spec: StudySpec, frame: pd.DataFrame):
    """The averaging period's trajectory (dynamic J_t, ADPSGD's p) per point, mean over seeds, every point
    beside the others: drawn only when some point's period changes during its run (by over a quarter of
    its mean: a constant J varies a little per epoch, by where the epoch's rounds fall)."""
    from matplotlib.ticker import MaxNLocator

    from .study import curves_of

    dims = [k for k in spec.dims if k != SEED_KEY]
    named = [d for d in dims if varies(frame, d)] or dims
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    groups = frame.groupby(dims, sort=False, dropna=False) if dims else [((), frame)]
    lines = []
    for _, group in groups:
        mean = _mean_curve([curves_of(by_number[n]) for n in group["trial"]], "local_steps_mean")
        if len(mean):
            lines.append((labels(group.head(1), named)[0] if named else "all", mean))
    if not any(m.max() - m.min() > 0.25 * m.mean() for _, m in lines):
        return None
    fig, ax = _figure(11.0, 4.0)
    for label, mean in lines[:CURVES_SHOWN]:
        ax.plot(mean.index, mean.values, marker="o", label=label)
    ax.set(xlabel="epoch", ylabel=NAMES["local_steps_mean"], title=f"{spec.name}: local steps per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the axes, never over a line
    return fig


def heatmap_figure(frame: pd.DataFrame, keys: list[str]):
    if not (K in keys and J in keys):
        return None
    agg = aggregate(frame, [J, K], [ACC]).pivot_table(index=J, columns=K, values=f"{ACC}_mean")
    fig, ax = _figure(5.0, 4.0)
    im = ax.imshow(agg.values, cmap="viridis", aspect="auto")
    ax.set(xticks=range(len(agg.columns)), xticklabels=agg.columns, yticks=range(len(agg.index)),
           yticklabels=agg.index, xlabel="K (workers)", ylabel="J (local steps)", title=NAMES[ACC])
    for (i, j), v in pd.DataFrame(agg.values).stack().items():
        ax.text(j, i, fmt(ACC, v), ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax)
    return fig


def batch_figure(frame: pd.DataFrame, keys: list[str]):
    """Accuracy vs batch size per optimizer; the batch axis is log2 with the batch sizes as ticks."""
    opt = optimizer_key(frame, keys)
    if not (opt and BATCH in keys):
        return None
    agg = aggregate(frame, [opt, BATCH], [ACC])
    fig, ax = _figure()
    for name, group in agg.groupby(opt, sort=False):
        ax.plot(group[BATCH], group[f"{ACC}_mean"], marker="o", label=str(name))
    batches = sorted(agg[BATCH].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set(xlabel="batch size", ylabel=NAMES[ACC], title="accuracy vs batch size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def alpha_figure(frame: pd.DataFrame, keys: list[str]):
    comm = next((c for c in (COMM, COMM_MODELED) if c in frame and frame[c].notna().any()), None)
    if not (ALPHA in keys and comm):
        return None
    agg = aggregate(frame, [ALPHA], [comm]).sort_values(ALPHA)
    fig, ax = _figure()
    ax.plot(agg[ALPHA], agg[f"{comm}_mean"], marker="o")
    ax.set(xlabel="alpha", ylabel=NAMES[comm], title="communication vs alpha (dynamic J)")
    ax.grid(alpha=0.3)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


# Optuna's own plots (optuna.visualization.matplotlib): drawn through pyplot, each saved and closed at once.

OptunaPlot = tuple[str, str, Callable[[], Any]]  # (file, title, draws it on a new pyplot figure)


def _complete(study) -> list:
    """The COMPLETE trials with a finite value: those Optuna's plots show (a diverged trial's is inf)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]


def searched(study, spec: StudySpec) -> list[str]:
    """The Optuna parameters (seed aside) that take more than one value over the complete trials."""
    trials = _complete(study)
    return [k for k in spec.dims if k != SEED_KEY and len({repr(t.params.get(k)) for t in trials}) > 1]


def parallel_plot(study, spec: StudySpec) -> list[OptunaPlot]:
    """Parallel coordinates of the varied parameters (as Optuna stores them) and the objective, for a
    study with 2 varied keys and 2 complete trials."""
    params = searched(study, spec)
    if len(params) < 2 or len(_complete(study)) < 2:
        return []

    def draw():
        from optuna.visualization.matplotlib import plot_parallel_coordinate

        ax = plot_parallel_coordinate(study, params=params, target_name=objective_title(spec))
        ax.set_title(f"{spec.name}: parallel coordinates", y=1.03)
        twins = [a for a in ax.figure.axes if a is not ax and ax.get_shared_x_axes().joined(ax, a)]
        for key, twin in zip(sorted(params), twins):  # one twin axis per parameter, in name order
            if key == BATCH and twin.get_yscale() == "log":
                _log2(twin, "y")
        _readable_ticks(ax)
        _clear_colorbar(ax, twins)
        return ax
    return [("parallel_coordinates.png", "parallel coordinates: varied parameters against the objective", draw)]


def _clear_colorbar(ax, twins: list) -> None:
    """Optuna's colorbar sits a fixed fraction right of the last parameter axis, over long tick labels
    (sub-configs): it moves right of every label."""
    fig = ax.figure
    cax = next((a for a in fig.axes if a is not ax and a not in twins), None)
    if cax is None:
        return
    right = max(a.get_tightbbox().x1 for a in [ax, *twins]) / fig.bbox.width
    pos = cax.get_position()
    cax.set_position([max(pos.x0, right + 0.03), pos.y0, pos.width, pos.height])


def _slice(study, params: list[str], target: str):
    from optuna.visualization.matplotlib import plot_slice

    axes = plot_slice(study, params=params, target_name=target)
    for ax in _axes(axes):
        if ax.get_xlabel() == BATCH and ax.get_xscale() == "log":
            _log2(ax, "x")
    return _readable_ticks(axes)


def _log2(ax, which: str) -> None:
    """A log batch-size axis of Optuna's as the report's: base 2, its ticks plain batch sizes."""
    from matplotlib.ticker import LogLocator, NullLocator, StrMethodFormatter

    getattr(ax, f"set_{which}scale")("log", base=2)
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(LogLocator(base=2))
    axis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axis.set_minor_locator(NullLocator())


def _axes(axes) -> list:
    """Optuna's plots return one Axes, or an array of them (plot_slice with several parameters)."""
    return list(axes.flat) if hasattr(axes, "flat") else [axes]


def tune_plots(study, spec: StudySpec) -> tuple[list[OptunaPlot], list[str]]:
    """A tune study's optimization history, slices and parameter importances, and why any is left out:
    each needs 2 complete trials; slices and importances a parameter that varies."""
    if spec.kind != "tune":
        return [], []
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    n, params, target = len(_complete(study)), searched(study, spec), objective_title(spec)
    if n < 2:
        return [], [f"Optimization history, slice and parameter importance plots left out: they need 2 complete "
                    f"trials with a finite objective, the study has {n}."]
    history = ("optimization_history.png", "optimization history",
               lambda: plot_optimization_history(study, target_name=target))
    if not params:
        return [history], ["Slice and parameter importance plots left out: no searched parameter varies over the "
                           "complete trials."]
    return [history,
            ("slice.png", "each searched parameter against the objective",
             lambda: _slice(study, params, target)),
            ("param_importances.png", "parameter importances",
             lambda: plot_param_importances(study, params=params, target_name=target))], []


def _optuna_plots(out: Path, drawn: list[OptunaPlot]) -> tuple[list[Plot], list[str]]:
    """Draw and save each plot, and a line for each one Optuna could not draw; Optuna's
    ExperimentalWarning, style sheet (plt.style.use) and figures stay local."""
    if not drawn:
        return [], []
    import warnings

    import matplotlib
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning

    saved, notes = [], []
    for name, title, draw in drawn:
        opened = set(plt.get_fignums())
        try:
            with warnings.catch_warnings(), matplotlib.rc_context():
                warnings.simplefilter("ignore", ExperimentalWarning)
                _axes(draw())[0].figure.savefig(out / name, dpi=100, bbox_inches="tight")
            saved.append((title, out / name))
        except Exception as err:  # noqa: BLE001 - one plot Optuna cannot draw leaves the rest of the report
            notes.append(f"{title[0].upper()}{title[1:]} left out: Optuna could not draw it "
                         f"({type(err).__name__}: {err}).")
        finally:
            for number in set(plt.get_fignums()) - opened:  # the plot's figures, saved or not
                plt.close(number)
    return saved, notes


def _readable_ticks(axes) -> Any:
    """Sub-config tick labels (Optuna stores them as JSON) written as the spec's labels: sgdm(lr=0.05)."""
    for ax in _axes(axes)[0].figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            texts = [t.get_text() for t in axis.get_ticklabels()]
            if any(_json_label(t) != t for t in texts):
                axis.set_ticks(axis.get_ticklocs(), [_json_label(t) for t in texts])
    return axes


def _json_label(text: str) -> str:
    try:
        value = json.loads(text) if text.startswith(("{", "[")) else text
    except ValueError:
        return text
    return value_label(value) if isinstance(value, dict) else text


# --------------------------------------------------------------------------------------------------


def write_report(study, spec: StudySpec, out: str | Path, fmt: str = "md") -> list[Path]:
    """Write every table (one file each, and all of them in report.md for Markdown, which links the
    plots by relative path) and the plots; report.md (or the CSV tables) first, the PNGs last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame = trials_frame(study, spec)
    shaped = tables(frame, spec)
    shown, notes = plots(study, spec, frame, out)
    paths = []
    if fmt == "csv":
        for name, table in shaped.items():
            path = out / f"{name}.csv"
            table.to_csv(path)
            paths.append(path)
        path = out / "trials.csv"
        frame.to_csv(path, index=False)
        paths.append(path)
    else:
        pruned = int((frame["state"] == "PRUNED").sum()) if len(frame) else 0
        parts = [f"# Study {spec.name}\n\n", f"{spec.description.strip()}\n\n" if spec.description else "",
                 f"{len(frame)} finished trials ({pruned} pruned, left out of the tables); objective: "
                 f"{objective_title(spec)} ({spec.objective.direction}d); mean ± std over seeds {spec.seeds}.\n"]
        for name, table in shaped.items():
            md = markdown(table)
            (out / f"{name}.md").write_text(md + "\n")
            paths.append(out / f"{name}.md")
            parts.append(f"\n## {name}\n\n{md}\n")
        if shown or notes:
            parts.append("\n## Plots\n\n" + "".join(f"![{title}]({path.name})\n\n" for title, path in shown)
                         + "".join(f"{note}\n\n" for note in notes))
        (out / "report.md").write_text("".join(parts).rstrip("\n") + "\n")
        paths.insert(0, out / "report.md")
    return paths + [path for _, path in shown]


def markdown(table: pd.DataFrame) -> str:
    """The table as Markdown, its text columns as written (tabulate would parse `50.00` and print 50)."""
    flat = table.reset_index()
    text = [i for i, col in enumerate(flat.columns) if flat[col].map(lambda v: isinstance(v, str)).all()]
    return flat.to_markdown(index=False, disable_numparse=text if len(flat) else False)


def log_report(client, parent_run_id: str, paths: list[Path]) -> None:
    for path in paths:
        client.log_artifact(parent_run_id, str(path), "report")
