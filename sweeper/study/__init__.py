"""Studies: Optuna drives the trials of a spec, MLflow records them, a kill at any moment loses nothing.

One module, one job:
- `storage`: the Optuna storage; finding, creating (grid points queued) and loading studies.
- `points`: what a trial runs: the grid queue, TPE sampling, the pruner.
- `queue`: retries: a dead worker's trial goes back to the queue and continues where it stopped.
- `trial`: one trial: `train()` with checkpoints, Optuna reports, a nested MLflow run.
- `parent`: the study's parent MLflow run and its report.
- `progress`: where a study stands.
- `run`: the loop of a `study run` / `worker` call, signals, and the study's end.
- `delete`: a study and everything it left.
"""
from ..spec import SpecError
from .attrs import (A_PARENT, A_REPORT, A_SPEC, A_TRACKING, A_UID, S_HISTORY, S_ORIGIN, T_ERROR, T_POINT,
                    T_RESULT, T_RUN, T_SKIPPED, T_WORKER, curves_of, origin, point_of, status_of, summary_of)
from .points import suggest, top_up
from .progress import Progress, best_point, progress
from .queue import recover, requeue, worker_id
from .run import Interrupted, Outcome, run
from .storage import load, open_storage, open_study, public_url, state_dir, storage_url, study_names, trial_id
from .trial import BUDGET_TAKEN, NOTHING_LEFT, POINT_TAKEN

__all__ = [
    "A_PARENT", "A_REPORT", "A_SPEC", "A_TRACKING", "A_UID", "BUDGET_TAKEN", "Interrupted", "NOTHING_LEFT",
    "Outcome", "POINT_TAKEN", "Progress", "S_HISTORY", "S_ORIGIN", "SpecError", "T_ERROR", "T_POINT", "T_RESULT",
    "T_RUN", "T_SKIPPED", "T_WORKER", "best_point", "curves_of", "load", "open_storage", "open_study", "origin",
    "point_of", "progress", "public_url", "recover", "requeue", "run", "state_dir", "status_of", "storage_url",
    "study_names", "suggest", "summary_of", "top_up", "trial_id", "worker_id",
]
