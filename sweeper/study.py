"""Optuna drives a study: storage with heartbeats, grid/TPE samplers, retries of killed trials, budget.

Concepts, each small:
- `open_storage`: an RDB storage whose heartbeats let the next worker notice a killed one.
- `requeue`: a failed trial becomes a WAITING copy of itself (same params, grid point, user attrs),
  remembering its *origin*, the first trial of the chain. The origin keys the trial's checkpoint
  directory and its MLflow child run, so a retry continues both.
- `SpecGridSampler`: Optuna's GridSampler, run in spec order, where only COMPLETE/PRUNED points count as
  done; a point whose trial failed is rerun (as a retry of that trial) by the next `study run`.
- `recover`: before running, trials of dead local processes (pid gone) and stale trials of any machine
  (heartbeat) are failed and requeued.
- `Runner`: the objective; one trial = one `train()` call with a per-epoch checkpoint, Optuna reports
  and a nested MLflow run (`run.TrackedRun`).

Diverged trials are COMPLETE with the worst possible value (-inf when maximizing) and status "diverged"
in their `sweeper.result` user attr: divergence is a measured outcome (the sources' tables record it), it counts
toward the budget, TPE learns to avoid the region, and it is never retried. FAIL is kept for crashes.
"""
from __future__ import annotations

import gc
import json
import math
import os
import shutil
import signal
import socket
import time
import traceback
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import tracking
from .run import objective_value, restored_history, trial_summary
from .spec import SEED_KEY, Choices, SpecError, StudySpec, changed_keys, encode, overlay

# Study user attrs
A_SPEC, A_PARENT, A_TRACKING = "sweeper.spec", "sweeper.mlflow_parent_run_id", "sweeper.tracking_uri"
A_UID = "sweeper.uid"
# Study system attr: "done/total" of the completion whose report was built (see `claim_completion`)
A_COMPLETED = "sweeper.completed"
# Trial user attrs
T_RUN, T_WORKER, T_ERROR = "sweeper.mlflow_run_id", "sweeper.worker", "sweeper.error"
T_SKIPPED = "sweeper.skipped"  # a trial that found its grid point (or the budget) taken by other workers: not a failure
NOTHING_LEFT = "no grid point left (the others run elsewhere)"
BUDGET_TAKEN = "the budget is met"
RETRY_FIRST = "a queued retry of a stopped trial runs first"
T_RESULT = "sweeper.result"  # {status, summary, curves}: one attr, one commit (each costs ~10 ms here)
# Trial system attrs: the first two are the ones Optuna's RetryHeartbeatStaleTrialCallback writes, so
# `RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)` reads our retries too.
S_ORIGIN, S_HISTORY, S_STALE = "failed_trial", "retry_history", "sweeper.stale_retries"
MAX_CONSECUTIVE_FAILURES = 3  # a tune study stops instead of sampling crash after crash


def state_dir() -> Path:
    return tracking.STATE_DIR


def storage_url(url: str | None = None) -> str:
    """The argument, else $SWEEPER_STORAGE, else SQLite beside MLflow's store under mlruns/."""
    url = url or os.environ.get("SWEEPER_STORAGE") or f"sqlite:///{state_dir()}/optuna.db"
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return url


def public_url(url: str) -> str:
    """A database URL as it may be printed or logged: the password masked."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: nothing to mask
        return url


def open_storage(url: str | None = None, heartbeat=None):
    import optuna

    interval = int(os.environ.get("SWEEPER_HEARTBEAT_INTERVAL", heartbeat.interval if heartbeat else 10))
    grace = int(os.environ.get("SWEEPER_HEARTBEAT_GRACE", heartbeat.grace if heartbeat else 30))
    max_retry = heartbeat.max_retry if heartbeat else 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeat_interval is "experimental" since Optuna 2.9
        try:
            url = storage_url(url)
            sqlite = url.startswith("sqlite:")
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,  # wait out other writers
                heartbeat_interval=interval, grace_period=grace, heartbeat_stale_trial_callback=Requeue(max_retry))
            if sqlite:
                _fast_sqlite(storage.engine)
            return storage
        except Exception as err:  # noqa: BLE001 - a bad URL or an unreachable database
            raise SpecError(f"Optuna storage {public_url(storage_url(url))}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from None


def _fast_sqlite(engine) -> None:
    """WAL journal with synchronous=NORMAL: a commit no longer waits for the disk (tens of ms each on a
    busy disk, several per epoch), and a killed process still loses nothing (only a power cut can lose the
    last commits).

    Every transaction starts with BEGIN IMMEDIATE (it takes SQLite's write lock, waiting up to the
    connection timeout for another process to commit). Python's sqlite3 otherwise begins a transaction
    only at its first write, after the reads it depends on: Optuna's read-check-write steps (taking a
    WAITING trial, failing a stale one) then are not atomic across processes, and two `study run --workers`
    processes took the same retry (measured: 11 of 60 queued trials taken twice by 4 processes). With it,
    SQLite serializes them as PostgreSQL's row locks do; a reader waits for the writer's commit (ms)."""
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
    engine.dispose()  # connections opened before the listener get replaced


# --------------------------------------------------------------------------------------------------
# Retries


class Requeue:
    """Heartbeat-stale trials are retried, at most `max_retry` times in a row (a trial that kills its
    worker every time must not be retried forever)."""

    def __init__(self, max_retry: int = 3):
        self.max_retry = max_retry

    def __call__(self, study, trial) -> None:
        requeue(study, trial, stale=True, max_retry=self.max_retry)


def requeue(study, trial, stale: bool = False, max_retry: int | None = None) -> bool:
    """Queue a WAITING copy of a FAILed trial that continues it (same params, grid point, MLflow run,
    checkpoint). An interrupt (Ctrl-C) does not count toward `max_retry`; a stale heartbeat does."""
    import optuna

    system = {S_ORIGIN: trial.number, **trial.system_attrs}
    system[S_HISTORY] = [*system.get(S_HISTORY, []), trial.number]
    if stale:
        system[S_STALE] = system.get(S_STALE, 0) + 1
        if max_retry is not None and system[S_STALE] > max_retry:
            return False
    else:
        system[S_STALE] = 0
    user = {k: v for k, v in trial.user_attrs.items() if k != T_WORKER}  # the dead worker is not the retry's
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.WAITING, params=trial.params,
                                        distributions=trial.distributions, user_attrs=user,
                                        system_attrs=system, intermediate_values=trial.intermediate_values))
    return True


def origin(trial) -> int:
    """The first trial of a retry chain: it names the checkpoint directory and the MLflow run."""
    return trial.system_attrs.get(S_ORIGIN, trial.number)


def worker_id() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def _start_time(pid: int) -> str | None:
    try:  # Linux: field 22 of /proc/PID/stat tells a reused pid from the original process
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _dead(worker: dict) -> bool:
    if worker.get("host") != socket.gethostname():
        return False  # another machine: only its heartbeat can tell
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return worker.get("start") is not None and _start_time(worker["pid"]) != worker["start"]


def _alive(worker: dict) -> bool:
    """A process of this machine that is still running (other machines: unknown, so False)."""
    return worker.get("host") == socket.gethostname() and "pid" in worker and not _dead(worker)


def recover(study, max_retry: int = 3) -> list[int]:
    """Fail and requeue the RUNNING trials of dead workers: at once when the worker was a process on this
    machine that is gone, otherwise once its heartbeat is older than the grace period."""
    import optuna
    from optuna.trial import TrialState

    storage, requeued = study._storage, []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _dead(t.user_attrs.get(T_WORKER) or {}):
            try:
                if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    if requeue(study, storage.get_trial(t._trial_id), stale=True, max_retry=max_retry):
                        requeued.append(t.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker got there first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
        optuna.storages.fail_stale_trials(study)
    requeued += [t.system_attrs.get(S_HISTORY, [None])[-1]
                 for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) if t.number not in before]
    return requeued


# --------------------------------------------------------------------------------------------------
# Samplers


def make_grid_sampler(spec: StudySpec, skip: set[int] | None = None):
    from optuna.samplers import GridSampler
    from optuna.trial import TrialState

    class SpecGridSampler(GridSampler):
        """GridSampler whose grid id i is spec.points()[i], where a point is done only when a trial of
        it is COMPLETE or PRUNED (Optuna's counts FAIL as visited), points are taken in spec order, and a
        point that failed before is run as a retry of that trial (same checkpoint and MLflow run)."""

        def __init__(self) -> None:
            super().__init__(spec.grid_space(), seed=0)
            names = self._param_names  # sorted
            self._all_grids = [tuple(encode(p[n]) for n in names) for p in spec.points()]
            self.skip = skip if skip is not None else set()  # failed in this process: not again now

        def _scan(self, study, exclude_id=None):
            done, busy, failed = set(), set(), {}
            for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
                g = t.system_attrs.get("grid_id")
                if g is None or t._trial_id == exclude_id or not self._same_search_space(t.system_attrs["search_space"]):
                    continue
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                    done.add(g)
                elif t.state in (TrialState.RUNNING, TrialState.WAITING):
                    busy.add(g)
                elif t.state == TrialState.FAIL and not t.user_attrs.get(T_SKIPPED):
                    failed.setdefault(g, []).append(t)
            return done, busy, failed

        def before_trial(self, study, trial) -> None:
            if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
                return  # a retry: it carries its grid point
            done, busy, failed = self._scan(study, exclude_id=trial._trial_id)
            todo = [g for g in range(len(self._all_grids)) if g not in done | busy | self.skip]
            storage = study._storage
            if not todo:  # another worker took the last point between our check and this trial
                storage.set_trial_user_attr(trial._trial_id, T_SKIPPED, NOTHING_LEFT)
                todo = [next(iter(done | busy), 0)]
            g = todo[0]
            storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
            storage.set_trial_system_attr(trial._trial_id, "grid_id", g)
            if g in failed:  # continue the failed trial's checkpoint and MLflow run
                chain = sorted(failed[g], key=lambda t: t.number)
                storage.set_trial_system_attr(trial._trial_id, S_ORIGIN, origin(chain[0]))
                storage.set_trial_system_attr(trial._trial_id, S_HISTORY, [t.number for t in chain])
                for key in (T_RUN,):
                    runs = [t.user_attrs[key] for t in chain if key in t.user_attrs]
                    if runs:
                        storage.set_trial_user_attr(trial._trial_id, key, runs[-1])

        def after_trial(self, study, trial, state, values) -> None:
            pass  # the Runner decides when the study is done (GridSampler would count FAIL as done)

    return SpecGridSampler()


def make_sampler(spec: StudySpec, skip: set[int] | None = None):
    import optuna

    if spec.kind == "grid":
        return make_grid_sampler(spec, skip)
    s = spec.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=s.multivariate)


def make_pruner(spec: StudySpec):
    import optuna

    p = spec.pruner
    if spec.kind == "grid" or p.name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps,
                                       interval_steps=p.interval_steps)


def suggest(trial, spec: StudySpec) -> dict[str, Any]:
    """The trial's point as decoded spec values (sub-configs as dicts)."""
    params = {}
    if spec.kind == "grid":
        space = spec.grid_space()
        for key in spec.dims:
            params[key] = spec.decode(key, trial.suggest_categorical(key, space[key]))
        return params
    for key, dim in spec.search.items():
        if isinstance(dim, Choices):
            params[key] = spec.decode(key, trial.suggest_categorical(key, [encode(c) for c in dim.choices]))
        elif dim.int:
            params[key] = trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
        else:
            params[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log, step=dim.step)
    params[SEED_KEY] = spec.seeds[0]
    return params


def point_of(trial, spec: StudySpec) -> dict[str, Any]:
    """Decoded params of a finished (frozen) trial."""
    out = {k: spec.decode(k, v) for k, v in trial.params.items()}
    out.setdefault(SEED_KEY, spec.seeds[0])
    return out


# --------------------------------------------------------------------------------------------------
# Studies in storage


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
    spec = StudySpec.from_dict(raw, source=f"study {name} (stored spec)")
    return study, spec


def open_study(spec: StudySpec, storage, skip: set[int] | None = None):
    """Create the study, or load it and check the spec still describes its trials."""
    import optuna

    if spec.name in study_names(storage):
        study, stored = load(spec.name, storage)
        diff = changed_keys(stored, spec)
        if diff:
            raise SpecError(f"{spec.source}: study {spec.name!r} already exists with a different spec (differs in: "
                            f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}); give the study a new name, "
                            f"or resume it as it was with `sweeper study resume {spec.name}`")
        if stored.base_from is not None:
            spec.base_from = stored.base_from  # the inherited params as first resolved
        study.set_user_attr(A_SPEC, spec.to_dict())  # budget, description, heartbeat may change
    else:
        if spec.base_from is not None and spec.base_from.params is None:
            inherit(spec, storage)
        shutil.rmtree(state_dir() / "checkpoints" / spec.name, ignore_errors=True)  # of a deleted namesake
        study = optuna.create_study(study_name=spec.name, storage=storage, direction=spec.objective.direction)
        study.set_user_attr(A_SPEC, spec.to_dict())
        study.set_user_attr(A_UID, uuid.uuid4().hex[:12])
    study.sampler = make_sampler(spec, skip)
    study.pruner = make_pruner(spec)
    return study


def inherit(spec: StudySpec, storage) -> None:
    """Resolve `base_from`: take the other study's best point as the base, then validate again."""
    src, src_spec = load(spec.base_from.study, storage)
    best = best_point(src, src_spec)
    if best is None:
        raise SpecError(f"{spec.source}: base_from.study: study {src.study_name!r} has no completed trial yet")
    spec.base_from.params = overlay(best[0], spec.base_from.keys)
    spec.validate()


def _rdb(study):
    """The RDBStorage behind a study (Optuna wraps it in a cache), or None for another kind of storage."""
    import optuna

    storage = getattr(study._storage, "_backend", study._storage)
    return storage if isinstance(storage, optuna.storages.RDBStorage) else None


def claim_completion(study, mark: str) -> bool:
    """Compare-and-set of the study's completion mark (A_COMPLETED) to `mark` ("done/total"): True for
    exactly one of the workers that see the study complete at the same moment, False for the others and
    for any later one. One `UPDATE ... WHERE value <> mark` decides: SQLite runs it under its write lock,
    PostgreSQL re-checks the WHERE after a concurrent update of the row; the row is inserted beforehand
    when missing (a duplicate insert fails on the attribute's unique key and is ignored). A budget raised
    later makes a new mark, so that completion gets its report too."""
    from optuna.storages._rdb.models import StudySystemAttributeModel as Attr
    from sqlalchemy import update
    from sqlalchemy.exc import IntegrityError

    storage = _rdb(study)
    if storage is None:  # an in-memory study: one process, nothing to race
        if study._storage.get_study_system_attrs(study._study_id).get(A_COMPLETED) == mark:
            return False
        study._storage.set_study_system_attr(study._study_id, A_COMPLETED, mark)
        return True
    value = json.dumps(mark)
    session = storage.scoped_session()
    try:
        try:
            session.add(Attr(study_id=study._study_id, key=A_COMPLETED, value_json=json.dumps(None)))
            session.commit()
        except IntegrityError:
            session.rollback()
        done = session.execute(update(Attr).where(Attr.study_id == study._study_id, Attr.key == A_COMPLETED,
                                                  Attr.value_json != value).values(value_json=value))
        session.commit()
        return done.rowcount == 1
    except Exception:
        session.rollback()
        raise
    finally:
        session.close()


def best_point(study, spec: StudySpec, trials=None) -> tuple[dict[str, Any], float] | None:
    """The best point (decoded params, seed included from its best trial) by the objective averaged
    over seeds; diverged trials count as the worst value."""
    from optuna.trial import TrialState

    groups: dict[str, list] = {}
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    for t in (t for t in trials if t.state == TrialState.COMPLETE):
        point = point_of(t, spec)
        key = json.dumps({k: encode(v) for k, v in point.items() if k != SEED_KEY}, sort_keys=True)
        groups.setdefault(key, []).append((t.value, point))
    best = None
    for members in groups.values():
        mean = sum(v for v, _ in members) / len(members)
        if math.isfinite(mean) and (best is None or spec.objective.better(mean, best[1])):
            best = ({k: v for k, v in members[0][1].items() if k != SEED_KEY or len(spec.seeds) == 1}, mean)
    return best


@dataclass
class Progress:
    counts: dict[str, int]  # by trial state
    done: int  # grid points (or tune trials) finished
    total: int
    best: tuple[dict, float] | None
    diverged: int = 0
    running: list[tuple[int, int]] = field(default_factory=list)  # (trial number, last epoch reported)
    remaining: int = 0  # to run in this call (grid points failed in it left out)


def progress(study, spec: StudySpec, skip: set[int] = frozenset()) -> Progress:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        state = "SKIPPED" if t.user_attrs.get(T_SKIPPED) else t.state.name
        counts[state] = counts.get(state, 0) + 1
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if spec.kind == "grid":
        done_ids = {t.system_attrs.get("grid_id") for t in finished}
        done, total = len(done_ids), len(spec.points())
        remaining = len(set(range(total)) - done_ids - set(skip))
    else:
        done, total = len(finished), spec.budget
        remaining = max(0, total - done)
    running = [(t.number, t.last_step or 0) for t in trials if t.state == TrialState.RUNNING]
    diverged = sum(1 for t in finished if status_of(t) == "diverged")
    return Progress(counts, done, total, best_point(study, spec, trials), diverged, running, remaining)


# --------------------------------------------------------------------------------------------------
# Trials

def status_of(trial) -> str:
    """completed | diverged | pruned, for a finished trial."""
    return (trial.user_attrs.get(T_RESULT) or {}).get("status", "completed")


def summary_of(trial) -> dict[str, Any]:
    return (trial.user_attrs.get(T_RESULT) or {}).get("summary", {})


def curves_of(trial) -> dict[str, list]:
    return (trial.user_attrs.get(T_RESULT) or {}).get("curves", {})


class Runner:
    """The Optuna objective of a study, and what happens around each trial (summary line, parent run,
    stopping when the grid or budget is done)."""

    def __init__(self, study, spec: StudySpec, client, skip: set[int], quiet: bool = False,
                 echo: Callable[[str], None] = print, report: bool = True):
        self.study, self.spec, self.client, self.skip = study, spec, client, skip
        self.quiet, self.echo, self.report = quiet, echo, report
        self.parent_status: str | None = None  # what close() set the parent run to (None: left as it was)
        self.report_path: Path | None = None  # the report this worker built when it completed the study
        self.runs: list = []  # TrackedRun of every trial of this call, delivered at the end
        self.ran, self.train_time, self.fails_in_row, self.callback_time = 0, 0.0, 0, 0.0
        self.completed = 0  # of `ran`: trials that finished (COMPLETE or PRUNED), not skipped or failed ones
        self.current: tuple[int, int] | None = None  # (trial id, number) while a trial runs
        self.in_trial = False  # inside the objective (Ctrl-C interrupts at once)
        self.stop_requested = False  # Ctrl-C between two trials (acted on at the next safe point)
        # Finished trials whose checkpoint is kept until their MLflow run has everything: the checkpoint's
        # history is the durable copy of the metrics if this process is killed before delivery.
        self.finished: list[tuple[Any, Path]] = []
        self.checkpoints = state_dir() / "checkpoints" / spec.name
        # MLflow runs are found again by this key (plus the trial's origin): unique per Optuna study, so a
        # namesake study in another storage, or one deleted and created again, never reuses these runs.
        self.key = f"{spec.name}/{study.user_attrs.get(A_UID, 'study')}"
        self.parent_recorded = study.user_attrs.get(A_PARENT)  # the parent run the study names (a query: once)
        self.parent = self._open_parent()
        self.prunes = spec.kind == "tune" and spec.pruner.name != "none"
        self.last_progress = progress(study, spec)  # for the next trial's header; refreshed after each
    # -- the parent run -------------------------------------------------------------------------------

    def _open_parent(self):
        """The study's parent run, opened (reused, found by key, or created) by its logger's thread."""
        from trainers.config import TrainConfig

        spec, study = self.spec, self.study
        logger = tracking.logger_for(self.client, self.parent_recorded,
                                     create={"experiment": spec.name, "run_name": f"study {spec.name}",
                                             "key": f"{self.key}/study",
                                             "tags": {"sweeper.kind": "study", "sweeper.study": spec.name}})
        params = {"kind": spec.kind, "objective": f"{spec.objective.direction} {spec.objective.mode} "
                  f"{spec.objective.metric}", "dims": ",".join(spec.dims), "seeds": spec.seeds}
        params.update({f"grid.{k}": [encode(v) for v in vs] for k, vs in spec.grid.items()})
        params.update({f"search.{k}": str(v) for k, v in spec.search.items()})
        if spec.base_from is not None:
            params.update({f"base_from.{k}": v for k, v in (spec.base_from.params or {}).items()})
        params.update({f"base.{k}": v for k, v in TrainConfig.from_dict(spec.base).flat().items()})
        logger.log_params(params)
        logger.set_tags({"sweeper.budget": spec.budget or len(spec.points()),
                         "optuna.storage": public_url(getattr(study._storage, "_backend", study._storage).url),
                         "mlflow.note.content": spec.description or f"sweeper study {spec.name} ({spec.kind})"})
        path = self._parent_stage() / "spec.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        import yaml

        path.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        logger.log_artifact(path)
        return logger

    def _parent_stage(self) -> Path:
        """This process's staging directory for the parent run's files (workers sharing mlruns/ each
        have their own: one removing its directory never takes a file another has yet to upload)."""
        return state_dir() / "runs" / f"{self.spec.name}-study-{os.getpid()}"

    @property
    def parent_run_id(self) -> str | None:
        return self.parent.run_id

    def _record_parent(self) -> None:
        if self.parent.run_id and self.parent_recorded != self.parent.run_id:
            self.study.set_user_attr(A_PARENT, self.parent.run_id)
            self.parent_recorded = self.parent.run_id

    # -- one trial --------------------------------------------------------------------------------------

    def remaining(self) -> int:
        """Grid points (or budget trials) not finished yet, leaving out points that failed in this call."""
        return progress(self.study, self.spec, self.skip).remaining

    def __call__(self, trial) -> float:
        """The objective: Ctrl-C interrupts it at once (see `_interrupts`); one that came between two
        trials stops here, before anything ran, and the trial is queued again like any interrupted one."""
        self.current = (trial._trial_id, trial.number)
        self.in_trial = True
        try:
            if self.stop_requested:
                raise KeyboardInterrupt
            return self._objective(trial)
        finally:
            self.in_trial = False

    def _objective(self, trial) -> float:
        import optuna
        from trainers.results import TrainResult
        from trainers.train import train

        from .run import TrackedRun, progress_bar

        spec, storage = self.spec, self.study._storage
        trial.set_user_attr(T_WORKER, worker_id())
        frozen = storage.get_trial(trial._trial_id)
        skipped = frozen.user_attrs.get(T_SKIPPED)  # (the grid sampler's: no point left)
        if not skipped:
            if spec.kind == "grid" and self._taken(frozen):
                skipped = "another worker runs this grid point"
            elif spec.kind == "tune":
                skipped = self._budget_full(frozen)
            if skipped:
                storage.set_trial_user_attr(trial._trial_id, T_SKIPPED, skipped)
        if skipped:
            raise RuntimeError(skipped)
        params = suggest(trial, spec)
        cfg = spec.config(params)
        first = origin(frozen)
        run = TrackedRun(self.client, spec.name, key=f"{self.key}/{first}", run_name=f"{first:03d} {spec.label(params)}",
                         parent=self.parent, run_id=self._known_run(frozen),
                         tags={"sweeper.study": spec.name, "optuna.origin_trial": first})
        self.runs.append(run)
        ckpt = self.checkpoints / str(first)
        restored = restored_history(ckpt)
        run.start(cfg, {"optuna.trial_number": trial.number, "optuna.state": "RUNNING", "sweeper.point": spec.label(params)},
                  restored)
        # Epochs Optuna holds for this trial: a retry carries those its stopped attempt reported (some
        # maybe past its checkpoint, trained again now: their first value stays, as for the MLflow run).
        reported = set(frozen.intermediate_values)
        for r in restored:  # epochs the killed attempt checkpointed but may not have reported
            self._report(trial, r, reported, prune=False)
        prog = self.last_progress
        resumed = f" (retry of trial {first}, from epoch {len(restored)})" if first != trial.number else ""
        self.echo(f"trial {trial.number} [{min(prog.done + 1, prog.total)}/{prog.total}] {spec.label(params)}{resumed}")
        reports = list(restored)

        def on_epoch(report) -> None:
            t = time.perf_counter()
            try:
                reports.append(report)
                run.epoch(report, once=first != trial.number)
                on_line(report)
                self._record_run(trial, run)
                self._report(trial, report, reported, prune=True)
            finally:  # inside train() but ours: counted as orchestration
                self.callback_time += time.perf_counter() - t

        t0 = time.perf_counter()
        try:
            with progress_bar(cfg.epochs, enabled=not self.quiet) as (on_progress, on_line, log):
                result = train(cfg, on_epoch=on_epoch, checkpoint_dir=ckpt, on_progress=on_progress, log=log)
        except optuna.TrialPruned:
            self.train_time += time.perf_counter() - t0
            pruned = TrainResult(status="completed", epochs_completed=len(reports), history=reports,
                                 total_time=time.perf_counter() - t0, device=str(cfg.device))
            self._finish(trial, run, pruned, "PRUNED", status="pruned")
            self.finished.append((run, ckpt))
            raise
        except KeyboardInterrupt:
            self._record_run(trial, run, wait=2.0)
            run.end("KILLED", {"optuna.state": "INTERRUPTED"})
            raise
        except Exception as err:
            self.train_time += time.perf_counter() - t0
            why = f"{type(err).__name__}: {err}"
            trial.set_user_attr(T_ERROR, why[:2000])
            (run.stage / "traceback.txt").write_text(traceback.format_exc())  # the console gets one line
            run.logger.log_artifact(run.stage / "traceback.txt")
            self._record_run(trial, run, wait=2.0)
            run.end("FAILED", {"optuna.state": "FAIL", "sweeper.error": why[:5000]})
            if spec.kind == "grid":
                self.skip.add(frozen.system_attrs["grid_id"])  # rerun by the next `study run`, not now
            raise
        self.train_time += time.perf_counter() - t0
        value = objective_value(spec, result)
        self._finish(trial, run, result, "COMPLETE", status=result.status)
        self.finished.append((run, ckpt))  # the checkpoint goes once MLflow has every epoch (see _release)
        return value

    def reconcile(self) -> int:
        """Deliver what a killed process left undelivered for trials it finished: their checkpoint is
        still there (see `finished`), so every epoch, the final figures and the run's end are logged
        from it (only what the run lacks), then the checkpoint goes."""
        from optuna.trial import TrialState
        from trainers.results import TrainResult

        from .run import TrackedRun

        spec, n = self.spec, 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            ckpt = self.checkpoints / str(origin(t))
            history = restored_history(ckpt)
            if not history or _alive(t.user_attrs.get(T_WORKER) or {}):
                continue  # (a live worker on this machine is delivering that run itself)
            point = point_of(t, spec)
            run = TrackedRun(self.client, spec.name, key=f"{self.key}/{origin(t)}",
                             run_name=f"{origin(t):03d} {spec.label(point)}", parent=self.parent,
                             run_id=self._known_run(t), tags={"sweeper.study": spec.name, "optuna.origin_trial": origin(t)})
            status = status_of(t)
            run.start(spec.config(point), {"optuna.trial_number": t.number, "sweeper.point": spec.label(point)}, history)
            result = TrainResult(status="diverged" if status == "diverged" else "completed", epochs_completed=len(history),
                                 history=history, total_time=sum(r.epoch_time + r.eval_time for r in history), device="")
            run.finish(result, {"optuna.state": t.state.name, "optuna.trial_number": t.number, "sweeper.status": status},
                       title=f"{spec.name} trial {t.number}: {spec.label(point)}")
            self.runs.append(run)
            self.finished.append((run, ckpt))
            n += 1
        return n

    def _release(self, timeout: float = 0.0) -> None:
        """Delete the checkpoints (and staged artifacts) of finished trials whose runs are delivered."""
        keep = []
        for run, ckpt in self.finished:
            if run.logger.join(timeout):  # all delivered: MLflow has every epoch now
                shutil.rmtree(ckpt, ignore_errors=True)
                shutil.rmtree(run.stage, ignore_errors=True)
            else:
                keep.append((run, ckpt))
        self.finished = keep

    def _taken(self, frozen, settle: float = 30.0) -> bool:
        """Whether another worker took this trial's grid point in the same instant (two workers can pick
        it between one's look and its write; the lower trial number keeps it, a finished one always).

        A lower-numbered trial that is RUNNING without a grid point yet is still picking one (its look may
        predate our write, so it may pick ours): wait until it has one, up to `settle` s (a worker killed
        in that instant never writes it), so that the higher number always sees the lower one's point."""
        from optuna.trial import TrialState

        g, mine = frozen.system_attrs.get("grid_id"), origin(frozen)
        deadline = time.monotonic() + settle
        while True:
            trials = self.study._storage.get_all_trials(self.study._study_id, deepcopy=False)
            picking = [t for t in trials if t.number < frozen.number and t.state == TrialState.RUNNING
                       and "grid_id" not in t.system_attrs]
            if not picking or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        for t in trials:
            if t.number == frozen.number or t.system_attrs.get("grid_id") != g or origin(t) == mine:
                continue
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                return True
            if t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < frozen.number:
                return True
        return False

    def _budget_full(self, frozen, poll: float = 2.0) -> str | None:
        """Why this tune trial should not run (None: it runs). N workers would otherwise each start one
        more trial when one is missing from the budget, and finish up to N-1 over it.

        Finished trials count, and so do those ahead of this one: running with a lower number (of two
        trials that look at once the lower one runs, so the budget's last trial is never skipped by both)
        or queued retries. While the budget is full only if the running ones finish, this trial waits and
        looks again: one failing, or going stale (its worker killed), leaves room for it. A queued retry
        goes first: this trial is skipped and its worker's next trial is that retry (which looks in turn:
        a retry of a trial stopped while it waited here does not run once the budget is met)."""
        from optuna.trial import TrialState

        budget, storage = self.spec.budget, self.study._storage
        while True:
            trials = storage.get_all_trials(self.study._study_id, deepcopy=False)
            done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
            ahead = sum(t.state == TrialState.RUNNING and t.number < frozen.number for t in trials)
            queued = sum(t.state == TrialState.WAITING for t in trials)
            if done >= budget:
                return BUDGET_TAKEN
            if done + ahead + queued < budget:
                return None
            if queued:
                return RETRY_FIRST
            time.sleep(poll)
            recover(self.study, self.spec.heartbeat.max_retry)  # a dead worker's trial: failed, queued again

    def _report(self, trial, report, reported: set[int], prune: bool) -> None:
        import optuna

        value = report.metrics().get(self.spec.objective.metric)
        if value is None:
            return
        if report.epoch not in reported:
            trial.report(value, report.epoch)
            reported.add(report.epoch)
        if prune and self.prunes and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {report.epoch}")

    def _known_run(self, frozen) -> str | None:
        """The MLflow run of the retry chain, if a previous attempt recorded it."""
        if T_RUN in frozen.user_attrs:
            return frozen.user_attrs[T_RUN]
        storage = self.study._storage
        for number in reversed(frozen.system_attrs.get(S_HISTORY, [])):
            t = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number))
            if T_RUN in t.user_attrs:
                return t.user_attrs[T_RUN]
        return None  # the run is then found by its key tag, or created

    def _record_run(self, trial, run, wait: float = 0.0) -> None:
        """Keep the trial's MLflow run id with the trial (a retry reuses it). A run opened only after
        its trial finished is not recorded; it is found again by its key tag (tracking.open_run)."""
        if wait:
            run.logger.wait_open(wait)
        if run.run_id and getattr(run, "recorded", None) != run.run_id:
            trial.set_user_attr(T_RUN, run.run_id)
            run.recorded = run.run_id

    def _finish(self, trial, run, result, state: str, status: str) -> None:
        from .run import curves

        trial.set_user_attr(T_RESULT, {"status": status, "summary": trial_summary(result.history, status),
                                       "curves": curves(result.history)})
        self._record_run(trial, run, wait=2.0)  # normally long opened; returns at once during an outage
        run.finish(result, {"optuna.state": state, "optuna.trial_number": trial.number, "sweeper.status": status},
                   title=f"{self.spec.name} trial {trial.number}: {self.spec.label(point_of(trial, self.spec))}")

    # -- around trials -----------------------------------------------------------------------------------

    def after_trial(self, study, frozen) -> None:
        """One summary line per trial; the parent run's progress; stop when nothing is left."""
        from optuna.trial import TrialState

        self.ran += 1
        self.current = None
        self._release()
        self._record_parent()
        prog = self.last_progress = progress(study, self.spec, self.skip)
        metric = self.spec.objective.metric
        secs = (frozen.duration.total_seconds() if frozen.duration else 0.0)
        if frozen.user_attrs.get(T_SKIPPED):
            what = f"skipped: {frozen.user_attrs[T_SKIPPED]}"
        elif frozen.state == TrialState.FAIL:
            self.fails_in_row += 1
            what = f"FAIL: {frozen.user_attrs.get(T_ERROR, 'see the log above')}"
        else:
            self.fails_in_row = 0
            self.completed += 1
            status = status_of(frozen)
            value = "diverged" if status == "diverged" else f"{metric} {frozen.value:.4g}"
            what = f"{frozen.state.name} {value}" + (f" at epoch {frozen.last_step}" if status == "pruned" else "")
        best = f"best {prog.best[1]:.4g}" if prog.best else "no best yet"
        self.echo(f"trial {frozen.number} {what}  ({best}; {prog.done}/{prog.total} done; {secs:.1f} s)")
        numbers = {"trials_done": prog.done}
        if prog.best:
            numbers["best_value"] = prog.best[1]
        self.parent.log_metrics(numbers, step=frozen.number)
        if prog.remaining == 0 or frozen.user_attrs.get(T_SKIPPED) == NOTHING_LEFT:  # (a met budget: remaining 0)
            study.stop()  # (points still running elsewhere are those workers' to finish)
        elif self.spec.kind == "tune" and self.fails_in_row >= MAX_CONSECUTIVE_FAILURES:
            self.echo(f"{self.fails_in_row} trials failed in a row; stopping (fix the cause, then resume)")
            study.stop()
        if self.stop_requested:  # Ctrl-C came while Optuna recorded this trial: it is recorded now
            raise KeyboardInterrupt

    def interrupted(self) -> None:
        """Ctrl-C: the running trial (FAILed by Optuna) is requeued so a resume continues it."""
        import optuna
        from optuna.trial import TrialState

        if self.current is None:
            return
        storage = self.study._storage
        trial_id = self.current[0]
        try:
            if storage.get_trial(trial_id).state == TrialState.RUNNING:
                storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
            frozen = storage.get_trial(trial_id)
            if frozen.state == TrialState.FAIL:
                requeue(self.study, frozen, stale=False)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

    def close(self, interrupted: bool = False, timeout: float | None = None) -> Progress:
        """End this worker's share of the study, then wait (bounded) for every run's items; what is left
        is spooled. Returns the study's progress as it was then.

        The parent run is shared by every worker, so it ends FINISHED only when the study is complete:
        every grid point (the budget) finished and no trial running anywhere. The one worker that sees
        that first (`claim_completion`) builds the report and logs it to the parent run. Otherwise a
        worker leaves the parent RUNNING while other trials run (their workers end it), and else ends it
        KILLED after Ctrl-C, FAILED when trials failed, or leaves it RUNNING when it only stopped at
        --n-trials (the study goes on with the next `study run`/`worker`)."""
        prog = progress(self.study, self.spec)
        complete = prog.done >= prog.total and not prog.running
        self.parent.set_tags({"sweeper.progress": f"{prog.done}/{prog.total}"})
        if complete:
            status = "FINISHED"
            if self.report and claim_completion(self.study, f"{prog.done}/{prog.total}"):
                self.report_path = self._final_report()
        elif prog.running:
            status = None
        elif interrupted:
            status = "KILLED"
        elif self.skip or self.fails_in_row:
            status = "FAILED"
        else:
            status = None
        self.parent_status = status
        self.parent.end(status)
        if timeout is None:
            timeout = float(os.environ.get("SWEEPER_FLUSH_TIMEOUT", 60))
        loggers = [r.logger for r in self.runs] + [self.parent]
        quick = time.monotonic() + min(2.0, timeout)
        for lg in loggers:  # usually all is delivered by now; say something only when it is not
            lg.join(max(0.0, quick - time.monotonic()))
        if any(lg.pending for lg in loggers):
            self.echo(f"waiting for MLflow at {self.client.tracking_uri} to take the last items (up to {timeout:.0f} s)")
        spooled = self.client.shutdown(timeout)
        if self.client.error is not None:
            self.echo(f"error: the MLflow store {self.client.tracking_uri} could not be opened: {self.client.error}")
        if spooled:
            self.echo(f"MLflow at {self.client.tracking_uri} did not take everything: {spooled} run(s) spooled under "
                      f"{state_dir() / 'spool'}; the next sweeper command that reaches it delivers them")
        self._release()
        for r in self.runs:  # staged artifacts of fully delivered runs are in MLflow now
            if r.logger.join(0) and not r.logger.spooled:
                shutil.rmtree(r.stage, ignore_errors=True)
        if self.parent.join(0):
            shutil.rmtree(self._parent_stage(), ignore_errors=True)
        self._record_parent()
        if complete and self.checkpoints.exists() and not any(self.checkpoints.iterdir()):
            self.checkpoints.rmdir()
        return prog

    def _final_report(self) -> Path | None:
        """`sweeper study report NAME` at the study's end: written under mlruns/reports/NAME and logged
        to the parent run (artifacts/report) before the parent run ends. A failure is a warning: the
        trials are all in Optuna and MLflow, and `study report` can build it again."""
        from .report import write_report

        out = state_dir() / "reports" / self.spec.name
        try:
            paths = write_report(self.study, self.spec, out, "md")
        except Exception as err:  # noqa: BLE001 - the study itself is complete and recorded
            self.echo(f"warning: the study report could not be built ({type(err).__name__}: {err}); "
                      f"build it with `sweeper study report {self.spec.name}`")
            return None
        for path in paths:
            self.parent.log_artifact(Path(path).resolve(), "report")
        return out / "report.md"


# --------------------------------------------------------------------------------------------------
# Running


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the study; the message says how to resume."""


@dataclass
class Outcome:
    study: Any
    spec: StudySpec
    ran: int  # trials run by this call
    progress: Progress
    parent_run_id: str | None
    wall_time: float  # seconds of this call, from storage opened to everything delivered
    train_time: float  # seconds spent inside trainers.train.train()
    setup_time: float = 0.0  # of wall_time: before the first trial (storage, study, recovery)
    close_time: float = 0.0  # of wall_time: after the last trial (waiting for MLflow deliveries)
    import_time: float = 0.0  # importing the trainer (torch): not in wall_time, any training pays it
    callback_time: float = 0.0  # of train_time: our per-epoch callback (Optuna report, MLflow enqueue)
    parent_status: str | None = None  # how this call ended the parent run (None: left RUNNING, see Runner.close)
    report: Path | None = None  # report.md, when this call completed the study and built the report

    @property
    def overhead(self) -> float:
        """Seconds of this call not spent training: outside train(), plus our callback inside it."""
        return self.wall_time - self.train_time + self.callback_time


def run(spec: StudySpec, storage: str | None = None, tracking_uri: str | None = None, n_trials: int | None = None,
        quiet: bool = False, echo: Callable[[str], None] = print, flush_timeout: float | None = None,
        report: bool = True, announce: bool = True) -> Outcome:
    """Run (or continue) a study until every grid point / the budget is finished, or `n_trials` trials
    (0: only create the study, recover what a killed worker left, and open the parent run; `announce`
    says then how to join it). Other processes may run the same study at the same time (`sweeper
    worker`). Ctrl-C or SIGTERM raises Interrupted: the running trial is queued again and its run KILLED."""
    import optuna

    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial says it
    study = runner = client = None
    with _sigterm_as_interrupt():
        try:
            store = open_storage(storage, spec.heartbeat)
            stored_uri = None
            if spec.name in study_names(store):  # the tracking URI the study was created with
                stored_uri = optuna.load_study(study_name=spec.name, storage=store).user_attrs.get(A_TRACKING)
            uri = tracking.tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or stored_uri)
            tracking.check_server(uri)  # a dead server is an error now, before anything is created
            # All MLflow work happens in this child process. Started before the trainer's import, so that
            # its own imports (MLflow: ~2.5 s of CPU) run beside that one rather than beside the first trial.
            client = tracking.Courier(uri, state_dir() / "spool")
            t_import = time.perf_counter()
            import trainers.train  # noqa: F401 - the trainer's import (torch) is not orchestration: timed apart
            import_time = time.perf_counter() - t_import
            skip: set[int] = set()
            study = open_study(spec, store, skip)
            if study.user_attrs.get(A_TRACKING) != client.tracking_uri:
                study.set_user_attr(A_TRACKING, client.tracking_uri)
            runner = Runner(study, spec, client, skip, quiet=quiet, echo=echo, report=report)
            if runner.reconcile():
                echo("delivering to MLflow what a previous run of this study left undelivered")
            requeued = recover(study, spec.heartbeat.max_retry)
            if requeued:
                echo(f"retrying trial(s) {', '.join(map(str, requeued))} of a previous run that stopped midway")
            ran = 0
            setup_time = time.perf_counter() - started - import_time
            if runner.remaining() == 0:
                echo(f"study {spec.name} is complete; nothing to run (see `sweeper study status {spec.name}`)")
            elif n_trials == 0:
                if announce:
                    echo(f"study {spec.name} is ready: {runner.remaining()} trial(s) to run (join it with "
                         f"`sweeper worker {spec.name}` on each machine, or `sweeper study resume {spec.name}`)")
            else:
                # What setup loaded (torch, Optuna, SQLAlchemy, rich: ~260k objects the collector tracks,
                # ~190k of them torch's) lives as long as the study's process: out of the collector's sight
                # for good, every collection during the trials, and the one at exit, is cheaper. Measured
                # on the first optimizer of a process (torch imports dynamo then): 1.04-1.10 s in a bare
                # script, 1.22-1.24 s with the study's modules loaded, 0.90-0.97 s with them frozen; and
                # `sweeper bench --study` exits ~0.8 s later when they are unfrozen after the trials.
                gc.freeze()
                with _interrupts(runner):
                    study.optimize(runner, n_trials=n_trials, catch=(Exception,), callbacks=[runner.after_trial],
                                   gc_after_trial=False)
                ran = runner.ran
        except KeyboardInterrupt:
            if runner is not None:
                runner.interrupted()
                runner.close(interrupted=True, timeout=flush_timeout)
            elif client is not None:
                client.shutdown(5.0)
            if study is None:
                raise Interrupted(f"interrupted before study {spec.name} was opened; nothing ran") from None
            raise Interrupted(f"interrupted; {runner.completed if runner else 0} trial(s) finished in this run. Resume "
                              f"with: sweeper study resume {spec.name}") from None
    t_close = time.perf_counter()
    try:
        with _deferred_interrupt(echo):  # every trial is done: the end of the study is worth its seconds
            prog = runner.close(timeout=flush_timeout)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped while handing the last items to MLflow; the next `sweeper study resume "
                          f"{spec.name}` delivers what is missing (from the trials' checkpoints)") from None
    end = time.perf_counter()
    return Outcome(study, spec, ran, prog, runner.parent_run_id, end - started - import_time, runner.train_time,
                   setup_time, end - t_close, import_time, runner.callback_time, runner.parent_status,
                   runner.report_path)


@contextmanager
def _signals(handler, signals=(signal.SIGINT, signal.SIGTERM)):
    """`handler` for `signals` while the block runs, the previous handlers after it (a no-op off the
    main thread, where Python cannot install handlers)."""
    try:
        previous = {s: signal.signal(s, handler) for s in signals}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def _interrupts(runner: Runner):
    """Ctrl-C or SIGTERM while the study runs: inside a trial (the objective), KeyboardInterrupt at once;
    between two trials, while Optuna creates or records a trial (a KeyboardInterrupt there would leave
    it RUNNING with nobody behind it), only a request that the next trial's start or the last trial's
    callback turns into one. A second signal between trials interrupts at once."""
    def handler(signum, frame):
        if runner.in_trial or runner.stop_requested:
            raise KeyboardInterrupt
        runner.stop_requested = True
    with _signals(handler):
        yield


@contextmanager
def _deferred_interrupt(echo: Callable[[str], None]):
    """While the last items go to MLflow (and the report is built), the first Ctrl-C or SIGTERM only
    says that it waits; a second one stops at once (what is not delivered then is delivered from the
    checkpoints by the next run of the study)."""
    seen = []

    def handler(signum, frame):
        if seen:
            raise KeyboardInterrupt
        seen.append(signum)
        echo("finishing the delivery to MLflow (Ctrl-C again to stop at once)")
    with _signals(handler):
        yield


@contextmanager
def _sigterm_as_interrupt():
    """`kill PID` stops a study as cleanly as Ctrl-C does (trial requeued, MLflow runs KILLED)."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    with _signals(handler, (signal.SIGTERM,)):
        yield
