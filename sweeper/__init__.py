"""sweeper: studies of distributed deep-learning training (Optuna drives, MLflow records).

The Python API (`sweeper/api.py`; importing `sweeper` imports no torch, MLflow, Optuna or pandas):

    sweeper.run_study(spec, *, set=None, storage=None, tracking_uri=None, n_trials=None, quiet=True)
    sweeper.trials(name, storage=None)        -> pandas.DataFrame, one row per trial
    sweeper.curves(name, storage=None)        -> pandas.DataFrame: trial, epoch, metric, value
    sweeper.build_report(name, out=None)      -> Path of report.md
"""
from .api import StudyResult, build_report, curves, run_study, trials

__all__ = ["StudyResult", "build_report", "curves", "run_study", "trials"]
