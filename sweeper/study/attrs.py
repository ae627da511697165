"""What sweeper keeps in Optuna besides params and values: attribute names, and readers of a trial.

Study user attrs hold the spec, the MLflow parent run and the report mark; trial user attrs hold the
grid point, the worker, the MLflow run and the result; trial system attrs hold the retry chain, under
the names Optuna's own `RetryFailedTrialCallback` writes, so `retried_trial_number` reads ours too.
"""
from __future__ import annotations

from typing import Any

# Study user attrs
A_SPEC, A_PARENT, A_TRACKING = "sweeper.spec", "sweeper.mlflow_parent_run_id", "sweeper.tracking_uri"
A_UID = "sweeper.uid"
A_REPORT = "sweeper.report"  # "done/total" of the completion whose report was built and handed to MLflow
A_RUN_PREFIX = "sweeper.run."  # + origin: the MLflow run of a trial that finished before its run id was known
# Trial user attrs
T_POINT = "sweeper.point"  # grid studies: the index of the trial's point in spec.points()
T_RUN, T_WORKER, T_ERROR = "sweeper.mlflow_run_id", "sweeper.worker", "sweeper.error"
T_SKIPPED = "sweeper.skipped"  # a trial that found its point (or the budget) taken by other workers: not a failure
T_RESULT = "sweeper.result"  # {status, summary, curves}: one attr, one commit
# Trial system attrs (Optuna's names)
S_ORIGIN, S_HISTORY, S_STALE = "failed_trial", "retry_history", "sweeper.stale_retries"


def origin(trial) -> int:
    """The first trial of a retry chain: it names the checkpoint directory and the MLflow run."""
    return trial.system_attrs.get(S_ORIGIN, trial.number)


def status_of(trial) -> str:
    """completed | diverged | pruned, for a finished trial."""
    return (trial.user_attrs.get(T_RESULT) or {}).get("status", "completed")


def summary_of(trial) -> dict[str, Any]:
    return (trial.user_attrs.get(T_RESULT) or {}).get("summary", {})


def curves_of(trial) -> dict[str, list]:
    return (trial.user_attrs.get(T_RESULT) or {}).get("curves", {})


def point_of(trial, spec) -> dict[str, Any]:
    """Decoded params of a trial (the seed included)."""
    from ..spec import SEED_KEY

    out = {k: spec.decode(k, v) for k, v in trial.params.items()}
    out.setdefault(SEED_KEY, spec.seeds[0])
    return out
