"""The Optuna storage of studies: opening it, and finding, creating and loading studies in it.

Everything here is Optuna's public API but one thing, kept in `_serialize_sqlite`: it listens on the
SQLAlchemy engine `RDBStorage.engine` that Optuna opens (tests/test_study_contract.py checks it still is
the engine Optuna's queries go through; setup.cfg bounds Optuna's major version).
"""
from __future__ import annotations

import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

from ..spec import SpecError, StudySpec, changed_keys, overlay
from .attrs import A_SPEC, A_UID


def state_dir() -> Path:
    """The state directory (`uris.STATE_DIR`: $SWEEPER_STATE_DIR, else the nearest mlruns/ at or above the
    working directory, else ./mlruns): checkpoints, spool, staged run files and reports live under it."""
    from .. import uris

    return uris.STATE_DIR


def report_dir(name: str) -> Path:
    """Where study NAME's report is written, by `study run` at completion and by `study report`."""
    return state_dir() / "reports" / name


def storage_url(url: str | None = None) -> str:
    """The argument, else $SWEEPER_STORAGE, else SQLite beside MLflow's store under the state dir."""
    from ..uris import storage_url as resolve

    return resolve(url)


def public_url(url: str) -> str:
    """A URL as it may be printed or logged: the password masked."""
    from ..uris import public

    return public(url)


def open_storage(url: str | None = None, heartbeat=None):
    """An RDBStorage whose heartbeats let any worker notice a killed one (see `queue.recover`)."""
    import optuna

    from .queue import Requeue

    interval = int(os.environ.get("SWEEPER_HEARTBEAT_INTERVAL", heartbeat.interval if heartbeat else 10))
    grace = int(os.environ.get("SWEEPER_HEARTBEAT_GRACE", heartbeat.grace if heartbeat else 30))
    max_retry = heartbeat.max_retry if heartbeat else 3
    url = storage_url(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeat_interval is "experimental" since Optuna 2.9
        try:
            sqlite = url.startswith("sqlite:")
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,  # wait out other writers
                heartbeat_interval=interval, grace_period=grace, heartbeat_stale_trial_callback=Requeue(max_retry))
        except Exception as err:  # noqa: BLE001 - a bad URL or an unreachable database
            raise SpecError(f"Optuna storage {public_url(url)}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from None
    if sqlite:
        _serialize_sqlite(storage.engine)
    return storage


def _serialize_sqlite(engine) -> None:
    """WAL journal with synchronous=NORMAL (a commit does not wait for the disk; a killed process loses
    nothing), and every transaction starts with BEGIN IMMEDIATE: SQLite's write lock is taken before the
    reads a write depends on, so Optuna's read-check-write steps (popping a WAITING trial, failing a
    stale one) are atomic across processes, as PostgreSQL's row locks make them. Without it two workers
    popped the same queued trial."""
    from sqlalchemy import event

    def pragmas(dbapi_connection, record) -> None:
        dbapi_connection.isolation_level = None  # the driver emits no BEGIN of its own; `begin` below does
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    def begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine, "connect", pragmas)
    event.listen(engine, "begin", begin)
    engine.dispose()  # connections opened before the listeners get replaced


def study_names(storage) -> list[str]:
    import optuna

    return sorted(optuna.get_all_study_names(storage))


def load(name: str, storage) -> tuple[Any, StudySpec]:
    """The Optuna study NAME and its stored spec; a SpecError lists the known names."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = study_names(storage)
        raise SpecError(f"no study named {name!r} in {public_url(storage.url)}; known: {', '.join(known) or 'none'}") from None
    raw = study.user_attrs.get(A_SPEC)
    if raw is None:
        raise SpecError(f"study {name!r} in {public_url(storage.url)} was not created by sweeper (no stored spec)")
    return study, StudySpec.from_dict(raw, source=f"study {name} (stored spec)")


def open_study(spec: StudySpec, storage):
    """Create the study (its grid points queued), or load it and check the spec still describes its
    trials. A study whose creation was killed midway is completed by `points.top_up` at every start."""
    import optuna

    from .points import make_pruner, make_sampler, top_up

    if spec.name in study_names(storage):
        study, stored = load(spec.name, storage)
        diff = changed_keys(stored, spec)
        if diff:
            raise SpecError(f"{spec.source}: study {spec.name!r} already exists with a different spec (differs in: "
                            f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}); give the study a new name, "
                            f"or resume it as it was with `sweeper study resume {spec.name}`")
        if stored.base_from is not None:
            spec.base_from = stored.base_from  # the inherited params as first resolved
        if study.user_attrs.get(A_SPEC) != spec.to_dict():
            study.set_user_attr(A_SPEC, spec.to_dict())  # budget, description, heartbeat may change
    else:
        if spec.base_from is not None and spec.base_from.params is None:
            inherit(spec, storage)
        shutil.rmtree(state_dir() / "checkpoints" / spec.name, ignore_errors=True)  # of a deleted namesake
        try:
            study = optuna.create_study(study_name=spec.name, storage=storage, direction=spec.objective.direction)
        except optuna.exceptions.DuplicatedStudyError:  # another worker created it this instant
            return open_study(spec, storage)
        study.set_user_attr(A_SPEC, spec.to_dict())
        study.set_user_attr(A_UID, uuid.uuid4().hex[:12])
    study.sampler = make_sampler(spec)
    study.pruner = make_pruner(spec)
    if spec.kind == "grid":
        top_up(study, spec)
    return study


def inherit(spec: StudySpec, storage) -> None:
    """Resolve `base_from`: take the other study's best point as the base, then validate again."""
    from .progress import best_point

    src, src_spec = load(spec.base_from.study, storage)
    best = best_point(src, src_spec)
    if best is None:
        raise SpecError(f"{spec.source}: base_from.study: study {src.study_name!r} has no completed trial yet")
    spec.base_from.params = overlay(best[0], spec.base_from.keys)
    spec.validate()


def trial_id(storage, study, number: int) -> int:
    """The storage's id of trial `number` of `study` (Optuna's storage calls take ids, trials show numbers)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)
