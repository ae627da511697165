"""The study's parent MLflow run: opened once per study (found again by its key), its trials' runs
nested under it; at completion it gets the report and ends FINISHED."""
from __future__ import annotations

import os
import time
from pathlib import Path

from .. import tracking
from ..mlflow_ui import experiment_tags
from ..spec import StudySpec, encode
from .attrs import A_PARENT, A_REPORT
from . import storage
from .storage import public_url, state_dir


def open_parent(client, study, spec: StudySpec, key: str, storage_url: str):
    """The parent run's logger (reused, found by key, or created by its own thread). The spec goes as an
    artifact and the varied keys as params: the base alone need not be a valid config (a grid may
    complete it), so it is not flattened into params."""
    logger = tracking.logger_for(client, study.user_attrs.get(A_PARENT),
                                 create={"experiment": spec.name, "run_name": f"study {spec.name}",
                                         "key": f"{key}/study", "start_time": int(time.time() * 1000),
                                         "tags": {"sweeper.kind": "study", "sweeper.study": spec.name}})
    column, ascending = objective_column(spec)
    logger.set_experiment_tags(experiment_tags(spec.name, column, ascending, varied_params(spec),
                                               spec.description or f"sweeper study {spec.name} ({spec.kind})"))
    params = {"kind": spec.kind, "objective": f"{spec.objective.direction} {spec.objective.mode} "
              f"{spec.objective.metric}", "dims": ",".join(spec.dims), "seeds": spec.seeds}
    params.update({f"grid.{k}": [encode(v) for v in vs] for k, vs in spec.grid.items()})
    params.update({f"search.{k}": str(v) for k, v in spec.search.items()})
    if spec.base_from is not None:
        params.update({f"base_from.{k}": v for k, v in (spec.base_from.params or {}).items()})
    logger.log_params(params)
    logger.set_tags({"sweeper.budget": spec.budget or len(spec.points()),
                     "optuna.storage": public_url(storage_url),
                     "mlflow.note.content": spec.description or f"sweeper study {spec.name} ({spec.kind})"})
    import yaml

    path = stage_dir(spec) / "spec.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    logger.log_artifact(path)
    return logger


def objective_column(spec: StudySpec) -> tuple[str, bool]:
    """The metric whose latest value is each trial's objective (the UI orders and shows it), and whether
    smaller is better: the metric itself when the objective is its last epoch's value, else the
    `objective` metric each trial logs at its last step."""
    from trainers.results import ADDITIVE

    obj = spec.objective
    plain = obj.mode == "final" and obj.metric not in ADDITIVE
    return (obj.metric if plain else "objective"), obj.direction == "minimize"


def varied_params(spec: StudySpec) -> list[str]:
    """The MLflow params (flattened config keys) that differ between the study's trials: a grid's
    sub-config values (`optim: [{name: sgdm, lr: 0.05}, ...]`) vary their leaves."""
    if spec.kind != "grid":
        return list(spec.dims)
    flats = []
    for point in spec.points():
        try:
            flats.append(spec.config(point).flat())
        except Exception:  # noqa: BLE001 - an invalid point fails as its trial; its keys are the spec's
            flats.append({})
    keys = [k for k in dict.fromkeys(k for f in flats for k in f) if len({repr(f.get(k)) for f in flats}) > 1]
    return keys or [k for k in spec.dims if k != "seed"]


def stage_dir(spec: StudySpec) -> Path:
    """This process's staging directory for the parent run's files (workers sharing the state dir each
    have their own: one removing its directory never takes a file another has yet to upload)."""
    return state_dir() / "runs" / f"{spec.name}-study-{os.getpid()}"


def report_dir(spec: StudySpec) -> Path:
    return storage.report_dir(spec.name)


def reported(study, mark: str) -> bool:
    """Whether the completion `mark` ("done/total") has its report built and handed to MLflow."""
    return study.user_attrs.get(A_REPORT) == mark


def build_report(study, spec: StudySpec, logger, echo) -> Path | None:
    """Write the report under reports/NAME (two workers completing the study in the same instant write
    the same files) and queue it on the parent run. A failure is a warning: the trials
    are all recorded, and the next run of the study, or `study report`, builds it."""
    from ..report import write_report
    from . import faults

    out = report_dir(spec)
    try:
        paths = write_report(study, spec, out, "md")
    except Exception as err:  # noqa: BLE001 - the study itself is complete and recorded
        echo(f"warning: the study report could not be built ({type(err).__name__}: {err}); "
             f"build it with `sweeper study report {spec.name}`")
        return None
    faults.point("report-written")
    for path in paths:
        logger.log_artifact(Path(path).resolve(), "report")
    return out / "report.md"
