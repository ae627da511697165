"""Study reports: pandas tables shaped like Poiatti et al.'s tables where the grid keys fit, a generic
table always, plots, written as Markdown or CSV and logged to the study's parent MLflow run.

Everything is read from Optuna (trial params, and the user attrs a trial stores when it finishes: final
figures, per-run time/communication totals, per-epoch curves), so a report needs no tracking server.
Seeds are aggregated as mean ± std; a diverged trial is shown as such, never averaged in.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from trainers.results import METRICS

from .spec import SEED_KEY, StudySpec, value_label

BATCH, K, J = "batch_size", "distributed.workers", "distributed.local_steps"
SLOWMO = ("distributed.slowmo", "distributed.slowmo.alpha", "distributed.slowmo.beta")
ALPHA = "distributed.dynamic.alpha"
ACC, LOSS = "final_eval_acc", "final_eval_loss"
COMPUTE, COMM, COMM_MODELED = "compute_time", "comm_time_measured", "comm_time_modeled"
# Column and axis titles, from the metrics' declaration (a trial's final figures as their metric's).
NAMES = {**{m.name: m.title for m in METRICS}, **{f"final_{m.name}": m.title for m in METRICS}}


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


def cell(row: pd.Series, col: str, digits: int = 2) -> str:
    """`51.47 ± 0.32`, `diverged`, or `-` (the source's mark for a configuration that did not train)."""
    mean, std = row.get(f"{col}_mean", math.nan), row.get(f"{col}_std", math.nan)
    if row["diverged"] == row["n"]:
        return "diverged"
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if isinstance(std, float) and not math.isnan(std) else "")
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
        out["slowmo"] = listing(frame, dims, [k for k in (K, J) if k in keys] + slowmo,
                                [COMPUTE, COMM, ACC, LOSS])  # Table 5
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
    metric = f"{spec.objective.metric} ({spec.objective.direction[:3]}, {spec.objective.mode})"
    dims = [d for d in dims if varies(frame, d)] or dims
    agg = aggregate(frame.assign(objective=frame["value"]), dims, ["objective", ACC, LOSS])
    table = pd.DataFrame({k: agg[k] for k in dims})
    digits = 2 if spec.objective.metric.endswith("acc") else 4
    table[metric] = [cell(r, "objective", digits) for _, r in agg.iterrows()]
    same = f"final_{spec.objective.metric}" if spec.objective.mode == "final" else None
    for col in (ACC, LOSS):
        if agg[f"{col}_mean"].notna().any() and col != same:  # not the objective's column twice
            table[NAMES[col]] = [cell(r, col, 2 if col == ACC else 4) for _, r in agg.iterrows()]
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
    table = pd.DataFrame({NAMES.get(c, c): [cell(r, c, 2 if c != LOSS else 4) for _, r in agg.iterrows()]
                          for c in present}, index=pd.Index(label, name="combination"))
    return table


def labels(frame: pd.DataFrame, keys: list[str]) -> list[str]:
    """`K=2 J=4` per row (column by column: iterrows would turn the ints into floats)."""
    return [" ".join(f"{_short(k)}={v}" for k, v in zip(keys, values)) for values in zip(*(frame[k] for k in keys))]


def _short(key: str) -> str:
    return {K: "K", J: "J", ALPHA: "alpha", BATCH: "B", "optim.name": "optimizer"}.get(key, key.split(".")[-1])


# --------------------------------------------------------------------------------------------------
# Plots


def _figure(width: float = 6.0, height: float = 3.6, cols: int = 1):
    from matplotlib.figure import Figure  # the object API: no pyplot state, safe off the main thread

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, cols)


def plots(study, spec: StudySpec, frame: pd.DataFrame, out: Path) -> list[Path]:
    """Accuracy curves (mean over seeds per point), and the shaped plots whose keys the study varies:
    K x J heatmap, accuracy vs batch size per optimizer, communication vs alpha."""
    from .study import curves_of

    dims = [k for k in spec.dims if k != SEED_KEY]
    paths: list[Path] = []
    if frame.empty:
        return paths
    keys = varied(frame, spec)
    curves: dict[str, list] = {}
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    names = labels(frame, dims) if dims else ["all"] * len(frame)
    for number, name in zip(frame["trial"], names):
        c = curves_of(by_number[number])
        if c.get("eval_acc"):
            curves.setdefault(name, []).append(c["eval_acc"])
    if curves:
        fig, ax = _figure(7.5, 4.2)
        for label, series in list(curves.items())[:20]:
            n = min(len(s) for s in series)
            mean = [sum((s[i] or math.nan) for s in series) / len(series) for i in range(n)]
            ax.plot(range(1, n + 1), mean, label=label)
        ax.set(xlabel="epoch", ylabel="eval accuracy [%]", title=f"{spec.name}: accuracy curves (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / "curves.png"))
    if K in keys and J in keys:
        agg = aggregate(frame, [J, K], [ACC]).pivot_table(index=J, columns=K, values=f"{ACC}_mean")
        fig, ax = _figure(5.0, 4.0)
        im = ax.imshow(agg.values, cmap="viridis", aspect="auto")
        ax.set(xticks=range(len(agg.columns)), xticklabels=agg.columns, yticks=range(len(agg.index)),
               yticklabels=agg.index, xlabel="K (workers)", ylabel="J (local steps)", title="eval accuracy [%]")
        for (i, j), v in pd.DataFrame(agg.values).stack().items():
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax)
        paths.append(_save(fig, out / "heatmap_k_j.png"))
    opt = optimizer_key(frame, keys)
    if opt and BATCH in keys:
        agg = aggregate(frame, [opt, BATCH], [ACC])
        fig, ax = _figure()
        for name, group in agg.groupby(opt, sort=False):
            ax.plot(group[BATCH], group[f"{ACC}_mean"], marker="o", label=str(name))
        batches = sorted(agg[BATCH].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set(xlabel="batch size", ylabel="eval accuracy [%]", title="accuracy vs batch size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / "accuracy_vs_batch.png"))
    comm = next((c for c in (COMM, COMM_MODELED) if c in frame and frame[c].notna().any()), None)
    if ALPHA in keys and comm:
        agg = aggregate(frame, [ALPHA], [comm]).sort_values(ALPHA)
        fig, ax = _figure()
        ax.plot(agg[ALPHA], agg[f"{comm}_mean"], marker="o")
        ax.set(xlabel="alpha", ylabel=NAMES[comm], title="communication vs alpha (dynamic J)")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out / "communication_vs_alpha.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------------------------------


def write_report(study, spec: StudySpec, out: str | Path, fmt: str = "md") -> list[Path]:
    """Write every table (one file each, and all of them in report.md for Markdown) and the plots."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame = trials_frame(study, spec)
    shaped = tables(frame, spec)
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
        parts = [f"# Study {spec.name}\n\n", f"{spec.description.strip()}\n\n" if spec.description else "",
                 f"{len(frame)} finished trials ({int((frame.get('state') == 'PRUNED').sum()) if len(frame) else 0} "
                 f"pruned, left out of the tables); {spec.objective.direction} {spec.objective.mode} "
                 f"{spec.objective.metric}; mean ± std over seeds {spec.seeds}.\n"]
        for name, table in shaped.items():
            md = table.reset_index().to_markdown(index=False)
            (out / f"{name}.md").write_text(md + "\n")
            paths.append(out / f"{name}.md")
            parts.append(f"\n## {name}\n\n{md}\n")
        (out / "report.md").write_text("".join(parts))
        paths.insert(0, out / "report.md")
    return paths + plots(study, spec, frame, out)


def log_report(client, parent_run_id: str, paths: list[Path]) -> None:
    for path in paths:
        client.log_artifact(parent_run_id, str(path), "report")
