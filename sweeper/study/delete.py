"""`study delete`: a study and everything it left: the Optuna study, its MLflow experiment (renamed
before MLflow's soft delete, so a new study of the same name starts a fresh experiment rather than
restoring the old one), its checkpoints, staged artifacts and reports."""
from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .storage import load, state_dir


@dataclass
class Doomed:
    """What deleting study `name` removes (shown before asking)."""

    name: str
    trials: int
    experiment_id: str | None
    runs: int
    tracking_uri: str
    paths: list[Path] = field(default_factory=list)


def plan(name: str, storage, tracking_uri: str | None = None) -> tuple[Doomed, object]:
    """What would go; also the MLflow client (the store is reached now: an unreachable one is an error
    before anything is deleted)."""
    from ..tracking import connect
    from .run import resolve_tracking

    study, spec = load(name, storage)
    client = connect(resolve_tracking(study, tracking_uri))
    exp = client.get_experiment_by_name(name)
    runs = len(client.search_runs([exp.experiment_id], max_results=5000)) if exp is not None else 0
    root = state_dir()
    paths = [p for p in (root / "checkpoints" / name, root / "reports" / name) if p.exists()]
    paths += sorted((root / "runs").glob(f"{name}-*")) if (root / "runs").exists() else []
    return Doomed(name, len(study.get_trials(deepcopy=False)), exp.experiment_id if exp else None, runs,
                  client.tracking_uri, paths), client


def delete(doomed: Doomed, storage, client) -> None:
    import optuna

    if doomed.experiment_id is not None:
        client.rename_experiment(doomed.experiment_id, f"{doomed.name}.deleted-{uuid.uuid4().hex[:8]}")
        client.delete_experiment(doomed.experiment_id)
    optuna.delete_study(study_name=doomed.name, storage=storage)
    for path in doomed.paths:
        shutil.rmtree(path, ignore_errors=True)
