"""Where a study stands: trials by state, points finished out of the total, the best point so far."""
from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from ..figures import fmt
from ..spec import SEED_KEY, StudySpec, encode
from .attrs import T_POINT, T_SKIPPED, point_of, status_of


@dataclass
class Progress:
    counts: dict[str, int]  # by trial state
    done: int  # grid points (or tune trials) finished
    total: int
    best: tuple[dict, float] | None
    diverged: int = 0
    running: list[tuple[int, int]] = field(default_factory=list)  # (trial number, last epoch reported)
    remaining: int = 0  # not finished yet (grid points failed in this call left out)
    queued: int = 0  # WAITING trials

    @property
    def complete(self) -> bool:
        return self.done >= self.total and not self.running


def progress(study, spec: StudySpec, skip: set[int] = frozenset()) -> Progress:
    """STUDY: an optuna Study, or a `StudyView` snapshot (states are compared by value: TrialState and
    `State` are the same IntEnum values)."""
    TrialState = State  # noqa: N806 - equal to optuna's TrialState member for member
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        state = "SKIPPED" if t.user_attrs.get(T_SKIPPED) else t.state.name
        counts[state] = counts.get(state, 0) + 1
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if spec.kind == "grid":
        done_ids = {t.user_attrs.get(T_POINT) for t in finished}
        done, total = len(done_ids), len(spec.points())
        remaining = len(set(range(total)) - done_ids - set(skip))
    else:
        done, total = len(finished), spec.budget
        remaining = max(0, total - done)
    running = [(t.number, t.last_step or 0) for t in trials if t.state == TrialState.RUNNING]
    queued = sum(t.state == TrialState.WAITING for t in trials)
    diverged = sum(1 for t in finished if status_of(t) == "diverged")
    return Progress(counts, done, total, best_point(study, spec, trials), diverged, running, remaining, queued)


def best_point(study, spec: StudySpec, trials=None) -> tuple[dict[str, Any], float] | None:
    """The best point (decoded params, seed included from its best trial) by the objective averaged
    over seeds; diverged trials count as the worst value."""
    TrialState = State  # noqa: N806

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


# --------------------------------------------------------------------------------------------------
# Reading a study fast (`study status`, `study list`, the Python API): a snapshot of its trials without
# importing Optuna (its import, SQLAlchemy's and the schema check of opening an RDBStorage are ~1 s of a
# `study status` that otherwise takes 0.1 s). Everything but `_read_tables` is plain Python over what it
# returns; when it fails (a schema this code does not know, a database it cannot open), the snapshot is
# taken through Optuna's public API instead, without heartbeats.


class State(enum.IntEnum):
    """Optuna's TrialState, value for value (an IntEnum: it compares equal to TrialState's members)."""

    RUNNING = 0
    COMPLETE = 1
    PRUNED = 2
    FAIL = 3
    WAITING = 4


class _JsonAttrs(Mapping):
    """Attributes as stored (JSON text), decoded when read: a finished trial's curves are large."""

    def __init__(self, raw: dict[str, str]):
        self._raw, self._done = raw, {}

    def __getitem__(self, key):
        if key not in self._done:
            self._done[key] = json.loads(self._raw[key])
        return self._done[key]

    def __iter__(self):
        return iter(self._raw)

    def __len__(self):
        return len(self._raw)


@dataclass
class TrialRecord:
    """The part of Optuna's FrozenTrial that sweeper reads, plus the age of its heartbeat."""

    number: int
    state: Any  # State (or optuna's TrialState, through the fallback)
    params: dict[str, Any]
    user_attrs: Mapping
    system_attrs: Mapping
    value: float | None
    intermediate_values: dict[int, float]
    datetime_start: datetime.datetime | None  # naive local time, as FrozenTrial's
    datetime_complete: datetime.datetime | None
    heartbeat_age: float | None = None  # seconds since its last heartbeat (None: none, or not known)

    @property
    def last_step(self) -> int | None:
        return max(self.intermediate_values) if self.intermediate_values else None

    @property
    def duration(self) -> datetime.timedelta | None:
        if self.datetime_start and self.datetime_complete:
            return self.datetime_complete - self.datetime_start
        return None


class StudyView:
    """A read-only snapshot of a study, with the part of optuna.Study's API that `progress`,
    `best_point` and `report.trials_frame` use."""

    def __init__(self, name: str, user_attrs: Mapping, trials: list, direction: str | None = None,
                 heartbeats: bool = False):
        self.study_name, self.user_attrs, self.trials, self.direction = name, user_attrs, trials, direction
        self.heartbeats = heartbeats  # whether heartbeat_age was read

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        return list(self.trials) if states is None else [t for t in self.trials if t.state in states]


def _local(dt) -> datetime.datetime | None:
    """Optuna's stored naive UTC time (a datetime, or SQLite's text) as naive local time, as FrozenTrial."""
    dt = _parse_time(dt)
    return None if dt is None else dt.replace(tzinfo=datetime.timezone.utc).astimezone().replace(tzinfo=None)


def _parse_time(dt) -> datetime.datetime | None:
    if dt is None or isinstance(dt, datetime.datetime):
        return dt if dt is None or dt.tzinfo is None else dt.replace(tzinfo=None)
    return datetime.datetime.fromisoformat(str(dt))


def _external(value: float, distribution_json: str) -> Any:
    """A parameter's stored (internal) value as Optuna gives it (`distribution.to_external_repr`)."""
    d = json.loads(distribution_json)
    name = d.get("name") or {"categorical": "CategoricalDistribution", "int": "IntDistribution"}.get(d.get("type"), "")
    if name == "CategoricalDistribution":
        return (d.get("attributes") or d)["choices"][int(value)]
    if name in ("IntDistribution", "IntUniformDistribution", "IntLogUniformDistribution"):
        return int(value)
    return float(value)


_SPECIAL = {"INF_POS": math.inf, "INF_NEG": -math.inf, "NAN": math.nan}


def _read_tables(query: Callable[[str, dict], list], name: str) -> StudyView | None:
    """THE one reader of Optuna's RDB schema (tables studies, study_directions, study_user_attributes,
    trials, trial_params, trial_values, trial_user_attributes, trial_system_attributes,
    trial_intermediate_values, trial_heartbeats; Optuna 4-5). Optuna has no public reader of a trial's
    heartbeat (RDBStorage keeps it for `fail_stale_trials`), and its public reader of a study costs the
    imports above. `query(sql, params)` runs one SELECT (named `:params`) and returns its rows. None when
    no study is named NAME. tests/test_status.py checks it against Optuna's own API."""
    rows = query("SELECT study_id FROM studies WHERE study_name = :name", {"name": name})
    if not rows:
        return None
    sid = {"sid": rows[0][0]}
    direction = query("SELECT direction FROM study_directions WHERE study_id = :sid ORDER BY objective", sid)
    attrs = _JsonAttrs({k: v for k, v in query("SELECT a.key, a.value_json FROM study_user_attributes a "
                                                 "WHERE a.study_id = :sid", sid)})
    now = _parse_time(query("SELECT CURRENT_TIMESTAMP", {})[0][0])  # the clock Optuna's heartbeats use
    trials: dict[int, TrialRecord] = {}
    for tid, number, state, start, complete in query(
            "SELECT trial_id, number, state, datetime_start, datetime_complete FROM trials WHERE study_id = :sid "
            "ORDER BY number", sid):
        trials[tid] = TrialRecord(number, State[state], {}, _JsonAttrs({}), _JsonAttrs({}), None, {},
                                  _local(start), _local(complete))

    def each(table: str, columns: str, where: str = "", order: str = "") -> list:
        return query(f"SELECT x.trial_id, {columns} FROM {table} x JOIN trials t ON t.trial_id = x.trial_id "
                     f"WHERE t.study_id = :sid{where}{order}", sid)

    for tid, key, value, dist in each("trial_params", "x.param_name, x.param_value, x.distribution_json",
                                      order=" ORDER BY x.param_id"):
        trials[tid].params[key] = _external(value, dist)
    for tid, value, kind in each("trial_values", "x.value, x.value_type", where=" AND x.objective = 0"):
        trials[tid].value = _SPECIAL.get(str(kind), value)
    for table, attr in (("trial_user_attributes", "user_attrs"), ("trial_system_attributes", "system_attrs")):
        for tid, key, value in each(table, "x.key, x.value_json"):
            getattr(trials[tid], attr)._raw[key] = value
    for tid, step, value, kind in each("trial_intermediate_values",
                                       "x.step, x.intermediate_value, x.intermediate_value_type"):
        trials[tid].intermediate_values[step] = _SPECIAL.get(str(kind), value)
    for tid, beat in each("trial_heartbeats", "x.heartbeat"):
        if beat is not None and now is not None:
            trials[tid].heartbeat_age = max(0.0, (now - _parse_time(beat)).total_seconds())
    for t in trials.values():
        t.intermediate_values = dict(sorted(t.intermediate_values.items()))
    return StudyView(name, attrs, list(trials.values()), str(direction[0][0]).lower() if direction else None,
                     heartbeats=True)


def _sqlite_path(url: str) -> str | None:
    """The file of a `sqlite:///PATH` URL (None: in memory, or not SQLite)."""
    if not url.lower().startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    return path if path and path != ":memory:" else None


def _given_storage(url: str | None) -> str:
    from .. import tracking

    return url or os.environ.get("SWEEPER_STORAGE") or f"sqlite:///{tracking.STATE_DIR}/optuna.db"


def _with_query(url: str | None, reader: Callable):
    """Run `reader(query)` on the storage URL with a plain connection: sqlite3 for a SQLite file (no
    SQLAlchemy), else a SQLAlchemy engine (no Optuna). Raises what the connection raises."""
    given = _given_storage(url)
    path = _sqlite_path(given)
    if path is not None:
        import sqlite3

        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        con = sqlite3.connect(path, timeout=30)
        try:
            return reader(lambda sql, params: con.execute(sql, params).fetchall())
        finally:
            con.close()
    import sqlalchemy

    from .storage import storage_url

    engine = sqlalchemy.create_engine(storage_url(given))
    try:
        with engine.connect() as con:
            return reader(lambda sql, params: [tuple(r) for r in con.execute(sqlalchemy.text(sql), params)])
    finally:
        engine.dispose()


def snapshot(name: str, storage: str | None = None) -> tuple[StudyView, StudySpec]:
    """Study NAME of the storage URL (default: $SWEEPER_STORAGE, else mlruns/optuna.db) and its stored
    spec, read once. A SpecError when there is no such study (it lists the known ones)."""
    from .attrs import A_SPEC

    try:
        view = _with_query(storage, lambda q: _read_tables(q, name))
    except Exception:  # noqa: BLE001 - an unknown schema, a file that is not there yet: Optuna's own API
        view = None
    if view is None or A_SPEC not in view.user_attrs:  # no such study: `load` says so, with the known names
        return _snapshot_by_optuna(name, storage)
    # Read, not validated again: it was when it was stored (and building every grid point's config is
    # most of a `study list` of large grids); commands that run it load it with `storage.load`.
    return view, StudySpec.from_dict(view.user_attrs[A_SPEC], source=f"study {name} (stored spec)", validate=False)


def _snapshot_by_optuna(name: str, storage: str | None) -> tuple[StudyView, StudySpec]:
    from .storage import load, open_storage

    study, spec = load(name, open_storage(storage))
    direction = study.direction.name.lower() if len(study.directions) == 1 else None
    return StudyView(name, study.user_attrs, study.get_trials(deepcopy=False), direction), spec


def names(storage: str | None = None) -> list[str]:
    """Every study in the storage, sorted (read like `snapshot`)."""
    try:
        return _with_query(storage, lambda q: sorted(r[0] for r in q("SELECT study_name FROM studies", {})))
    except Exception:  # noqa: BLE001 - as in `snapshot`
        from .storage import open_storage, study_names

        return study_names(open_storage(storage))


# --------------------------------------------------------------------------------------------------
# Status: progress, what runs and whether its worker still lives, elapsed time and the time left


@dataclass
class Running:
    number: int
    epoch: int  # last epoch reported
    elapsed: float | None  # seconds since it started
    worker: str | None  # host:pid
    heartbeat_age: float | None  # seconds since its last heartbeat (None: not known)
    stale: str | None = None  # why it is stale (its worker is gone, or its heartbeat is old), else None


@dataclass
class Status:
    name: str
    spec: StudySpec
    progress: Progress
    counts: dict[str, int]  # by state, STALE apart from RUNNING
    running: list[Running]
    elapsed: float | None  # seconds since the first trial started (to the last one's end when none runs)
    eta: float | None  # seconds to completion at the pace of the finished trials (None: no estimate yet)
    mean_trial: float | None  # seconds, finished trials
    grace: float
    overrides: list[str]

    def to_dict(self) -> dict:
        p = self.progress
        return {"name": self.name, "kind": self.spec.kind, "done": p.done, "total": p.total, "counts": self.counts,
                "diverged": p.diverged, "best_value": p.best[1] if p.best else None,
                "best_params": p.best[0] if p.best else None,
                "running": [[r.number, r.epoch] for r in self.running],
                "trials_running": [dataclasses.asdict(r) for r in self.running],
                "stale": [r.number for r in self.running if r.stale], "complete": p.complete,
                "elapsed_s": self.elapsed, "eta_s": self.eta, "mean_trial_s": self.mean_trial,
                "heartbeat_grace_s": self.grace, "overrides": self.overrides}


def heartbeat_grace(spec: StudySpec) -> float:
    return float(os.environ.get("SWEEPER_HEARTBEAT_GRACE", spec.heartbeat.grace))


def status(view, spec: StudySpec, now: datetime.datetime | None = None) -> Status:
    """Where study VIEW (a snapshot, or an optuna Study) stands: trials by state, RUNNING trials whose
    worker is gone (a process of this machine) or whose heartbeat is older than the grace counted STALE
    (the next worker to start retries them), elapsed time and an estimate of the time left."""
    from .attrs import T_WORKER
    from .queue import dead

    now = now or datetime.datetime.now()
    trials = view.get_trials(deepcopy=False)
    p = progress(view, spec)
    grace = heartbeat_grace(spec)
    counts = dict(p.counts)
    running = []
    for t in trials:
        if t.state.name != "RUNNING":
            continue
        worker = t.user_attrs.get(T_WORKER)
        age = getattr(t, "heartbeat_age", None)
        elapsed = (now - t.datetime_start).total_seconds() if t.datetime_start else None
        r = Running(t.number, t.last_step or 0, elapsed, f"{worker['host']}:{worker['pid']}" if worker else None, age)
        if worker and dead(worker):
            r.stale = "its worker is gone"
        elif age is not None and age > grace:
            r.stale = f"no heartbeat for {age:.0f} s"
        elif worker is None and elapsed is not None and elapsed > grace:
            r.stale = f"no worker recorded {elapsed:.0f} s after it started"
        running.append(r)
    stale = sum(1 for r in running if r.stale)
    if stale:
        counts["RUNNING"] = counts.get("RUNNING", 0) - stale
        if counts["RUNNING"] <= 0:
            del counts["RUNNING"]
        counts["STALE"] = stale
    from .attrs import T_SKIPPED

    finished = [t.duration.total_seconds() for t in trials if t.state.name in ("COMPLETE", "PRUNED")
                and t.duration is not None and not t.user_attrs.get(T_SKIPPED)]
    mean = sum(finished) / len(finished) if finished else None
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    live = [r for r in running if not r.stale]
    elapsed = eta = None
    if starts:
        end = now if live or not ends else max(ends)
        elapsed = max(0.0, (end - min(starts)).total_seconds())
    if p.complete:
        eta = 0.0
    elif mean is not None:
        left = max(0, p.total - p.done - len(live))  # not started yet (stale ones start again)
        work = left * mean + sum(max(0.0, mean - (r.elapsed or 0.0)) for r in live)
        eta = work / max(1, len(live))
    return Status(view.study_name, spec, p, counts, running, elapsed, eta, mean, grace, list(spec.overrides))


def study_eta(s: Status, trial_left: float | None, trial_total: float | None) -> float | None:
    """Seconds until the study is done, seen from inside a trial that `s` (read before it started) does
    not count: the trials not started yet at the pace of the finished ones (of this one, before any
    finished), plus what this and the other live trials have left, shared by the live workers."""
    live = [r for r in s.running if not r.stale]
    mean = s.mean_trial if s.mean_trial is not None else trial_total
    if mean is None or trial_left is None:
        return None
    left = max(0, s.progress.total - s.progress.done - len(live) - 1)
    work = left * mean + trial_left + sum(max(0.0, mean - (r.elapsed or 0.0)) for r in live)
    return work / (len(live) + 1)


@dataclass
class StudyRow:
    """A study's progress beside one of its trials' (in `study run`'s console), from `status`, read
    before the trial started."""
    status: Status

    @property
    def done(self) -> int:
        return self.status.progress.done

    @property
    def total(self) -> int:
        return self.status.progress.total

    def eta(self, trial_left: float | None, trial_total: float | None) -> str:
        eta = study_eta(self.status, trial_left, trial_total)
        return f"ETA {duration_label(eta)}" if eta is not None else "ETA after the first epoch"

    def text(self, trial_left: float | None, trial_total: float | None) -> str:
        return f"study {self.status.name}: {self.done}/{self.total} done, {self.eta(trial_left, trial_total)}"


def duration_label(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def status_lines(s: Status) -> list[str]:
    """`study status` as text lines."""
    p, spec = s.progress, s.spec
    lines = [f"study {s.name} ({spec.kind}): {p.done}/{p.total} done ({100 * p.done / max(p.total, 1):.0f}%)"
             + ("; complete" if p.complete else "")]
    order = ["COMPLETE", "PRUNED", "RUNNING", "STALE", "WAITING", "FAIL", "SKIPPED"]
    states = sorted(s.counts.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 99, kv[0]))
    lines.append("trials: " + (", ".join(f"{k} {v}" for k, v in states) or "none")
                 + (f" ({p.diverged} diverged)" if p.diverged else ""))
    if s.overrides:
        lines.append("set: " + " ".join(f"--set {o}" for o in s.overrides))
    if p.best:
        lines.append(f"best {spec.objective.metric}: {fmt(spec.objective.metric, p.best[1])} at {spec.label(p.best[0])}"
                     + (" (mean over seeds)" if len(spec.seeds) > 1 else ""))
    timing = [f"elapsed {duration_label(s.elapsed)}"] if s.elapsed is not None else []
    if s.mean_trial is not None:
        timing.append(f"{duration_label(s.mean_trial)} per trial")
    if not p.complete:
        timing.append(f"ETA {duration_label(s.eta)}" if s.eta is not None else "ETA unknown (no trial finished yet)")
    if timing:
        lines.append("time: " + ", ".join(timing))
    for r in s.running:
        where = f", worker {r.worker}" if r.worker else ""
        beat = f", heartbeat {r.heartbeat_age:.0f} s ago" if r.heartbeat_age is not None and not r.stale else ""
        if r.stale:
            age = r.heartbeat_age if r.heartbeat_age is not None else r.elapsed
            lines.append(f"stale: trial {r.number} (epoch {r.epoch} reported; stale {age or 0:.0f} s{where}: "
                         f"{r.stale}; the next worker retries it)")
        else:
            lines.append(f"running: trial {r.number}, epoch {r.epoch} reported ({duration_label(r.elapsed)}{where}"
                         f"{beat})")
    return lines
