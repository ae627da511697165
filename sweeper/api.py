"""The Python API: run a study and read its trials from Python (a notebook, a script).

    import sweeper

    result = sweeper.run_study("studies/quickstart.yaml", set=["base.epochs=2"])
    frame = sweeper.trials(result.name)        # one row per trial: params, state, value, final figures
    curves = sweeper.curves(result.name)       # per-epoch curves, long form: trial, epoch, metric, value
    path = sweeper.build_report(result.name)   # mlruns/reports/NAME/report.md (tables and plots)

`import sweeper` imports none of torch, MLflow, Optuna or pandas; each function imports what it needs.
The storage is `storage=` (an Optuna RDB URL), else $SWEEPER_STORAGE, else optuna.db in the state
directory (see `uris.STATE_DIR`), as for the command line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["StudyResult", "curves", "build_report", "run_study", "trials"]


@dataclass
class StudyResult:
    """What `run_study` did: the study's name and standing, and where its records are."""

    name: str
    kind: str  # grid | tune
    complete: bool  # every grid point / the whole budget is finished
    done: int  # grid points (tune: trials) finished
    total: int
    ran: int  # trials this call ran
    failed: int  # trials of this call that failed
    best_value: float | None  # the objective at the best point (mean over seeds)
    best_params: dict[str, Any] | None
    metric: str
    parent_run_id: str | None  # the study's MLflow parent run
    tracking_uri: str | None  # where MLflow recorded it (password masked)
    report: Path | None  # report.md, when this call completed the study and built it
    storage: str | None = field(default=None, repr=False)  # as given

    def trials(self) -> "pd.DataFrame":
        return trials(self.name, storage=self.storage)

    def curves(self) -> "pd.DataFrame":
        return curves(self.name, storage=self.storage)


def run_study(spec: str | os.PathLike | dict, *, set: Iterable[str] | None = None, storage: str | None = None,
              tracking_uri: str | None = None, n_trials: int | None = None, quiet: bool = True,
              name: str | None = None, report: bool = True) -> StudyResult:
    """Run the study of SPEC (a YAML path, or a spec as a dict) until it is complete (or `n_trials`
    trials ran), or continue it: a study that exists runs only what is missing, as `sweeper study run`.

    set: `--set` items (`["base.epochs=2", "grid.optim.lr=[0.01,0.1]", "seeds=[0,1]"]`, values parsed as
    YAML), stored with the study; name: the study's name instead of the spec's. quiet: no output (else
    the lines `sweeper study run` prints). A bad spec or override raises `sweeper.spec.SpecError`
    (a ValueError-like ConfigError) before anything is created; Ctrl-C raises
    `sweeper.study.Interrupted` (the running trial is queued again)."""
    import gc

    from .spec import load_spec_with, with_overrides
    from .study import run
    from .uris import public

    items = list(set or [])
    if isinstance(spec, dict):
        study_spec = with_overrides(spec, items, "spec (dict)", name)
    else:
        study_spec = load_spec_with(os.fspath(spec), items, name)
    echo: Callable[[str], None] = (lambda _: None) if quiet else print
    try:
        out = run(study_spec, storage=storage, tracking_uri=tracking_uri, n_trials=n_trials, quiet=True, echo=echo,
                  report=report)
    finally:
        gc.unfreeze()  # `run` freezes what a study's own process keeps for good; this process goes on
    p = out.progress
    return StudyResult(study_spec.name, study_spec.kind, p.complete, p.done, p.total, out.ran, out.failed,
                       p.best[1] if p.best else None, p.best[0] if p.best else None, study_spec.objective.metric,
                       out.parent_run_id, public(out.tracking_uri) if out.tracking_uri else None, out.report,
                       storage)


def trials(name: str, storage: str | None = None) -> "pd.DataFrame":
    """One row per trial of study NAME, by trial number: its parameters (one column per varied key;
    a sub-config also as one column per key it sets), `seed`, `trial`, `state` (COMPLETE, PRUNED, FAIL,
    RUNNING, WAITING), `status` (completed, diverged, pruned), `value` (the objective), and for
    finished trials their final figures (final_eval_acc, total_time, comm_rounds, ...), as the report's
    tables read them (`sweeper.report.trials_frame`)."""
    import pandas as pd

    from .report import trials_frame
    from .spec import SEED_KEY
    from .study.attrs import point_of
    from .study.progress import snapshot

    view, spec = snapshot(name, storage)
    finished = trials_frame(view, spec)
    rows = [finished]
    others = [t for t in view.get_trials(deepcopy=False) if t.state.name not in ("COMPLETE", "PRUNED")]
    if others:
        from .report import _label

        extra = []
        for t in others:
            point = point_of(t, spec) if t.params else {}
            row = {key: _label(point.get(key)) for key in spec.dims if key != SEED_KEY and key in point}
            row.update(seed=point.get(SEED_KEY), trial=t.number, state=t.state.name, status=None, value=t.value)
            extra.append(row)
        rows.append(pd.DataFrame(extra))
    rows = [r for r in rows if not r.empty]
    frame = pd.concat(rows, ignore_index=True) if rows else finished
    if "trial" in frame:
        frame = frame.sort_values("trial", kind="stable").reset_index(drop=True)
    return frame


def curves(name: str, storage: str | None = None) -> "pd.DataFrame":
    """The per-epoch curves of the finished trials of study NAME in long form: columns `trial`,
    `epoch` (from 1), `metric` (eval_acc, eval_loss, train_loss, lr, ...) and `value`; join with
    `trials(NAME)` on `trial` for the parameters."""
    import pandas as pd

    from .study.attrs import curves_of
    from .study.progress import snapshot

    view, _ = snapshot(name, storage)
    rows = [(t.number, epoch, metric, value)
            for t in view.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")
            for metric, series in curves_of(t).items() if isinstance(series, list)
            for epoch, value in enumerate(series, 1)]
    frame = pd.DataFrame(rows, columns=["trial", "epoch", "metric", "value"])
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    return frame


def build_report(name: str, out: str | os.PathLike | None = None, storage: str | None = None, fmt: str = "md") -> Path:
    """Write the tables and plots of study NAME into OUT [reports/NAME in the state directory] (as `sweeper study report
    NAME --no-log`) and return report.md (fmt="csv": the directory of the CSV files)."""
    from .report import write_report
    from .study.progress import snapshot
    from .study.storage import report_dir

    view, spec = snapshot(name, storage)
    directory = Path(out) if out is not None else report_dir(name)
    paths = write_report(view, spec, directory, fmt)
    return paths[0] if fmt == "md" else directory
