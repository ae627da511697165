"""Retries: a trial whose worker died goes back to the queue, continuing where it stopped.

A trial is RUNNING from `ask` on. Its worker then records a first heartbeat and only after it its own
identity (`T_WORKER`), so every RUNNING trial is in one of three cases, each recovered by `recover`:
- a worker record of this machine whose process is gone: failed and requeued at once;
- a heartbeat older than the grace period (any machine): Optuna's `fail_stale_trials`, which calls
  `Requeue`;
- no worker record `grace` seconds after it started: its worker was killed between `ask` and its
  first heartbeat; failed and requeued.
A requeued trial is a WAITING copy (same params, grid point, MLflow run, intermediate values) that
names the chain's first trial (`origin`): its checkpoint directory and MLflow run.
"""
from __future__ import annotations

import datetime
import os
import socket
import warnings
from pathlib import Path

from .attrs import S_HISTORY, S_ORIGIN, S_STALE, T_ERROR, T_WORKER
from .storage import trial_id


class Requeue:
    """Optuna's stale-heartbeat callback: retry, at most `max_retry` times in a row (a trial that kills its
    worker every time must not be retried forever)."""

    def __init__(self, max_retry: int = 3):
        self.max_retry = max_retry

    def __call__(self, study, trial) -> None:
        requeue(study, trial, stale=True, max_retry=self.max_retry)


def requeue(study, trial, stale: bool = False, max_retry: int | None = None) -> bool:
    """Queue a WAITING copy of a FAILed trial that continues it. An interrupt (Ctrl-C) does not count
    toward `max_retry`; a dead worker does."""
    import optuna

    system = {S_ORIGIN: trial.number, **trial.system_attrs}
    system[S_HISTORY] = [*system.get(S_HISTORY, []), trial.number]
    if stale:
        system[S_STALE] = system.get(S_STALE, 0) + 1
        if max_retry is not None and system[S_STALE] > max_retry:
            return False
    else:
        system[S_STALE] = 0
    user = {k: v for k, v in trial.user_attrs.items() if k not in (T_WORKER, T_ERROR)}  # not the retry's
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.WAITING, params=trial.params,
                                        distributions=trial.distributions, user_attrs=user,
                                        system_attrs=system, intermediate_values=trial.intermediate_values))
    return True


def worker_id() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def _start_time(pid: int) -> str | None:
    try:  # Linux: field 22 of /proc/PID/stat tells a reused pid from the original process
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def dead(worker: dict) -> bool:
    """A process of this machine that is gone (other machines: only their heartbeat can tell)."""
    if worker.get("host") != socket.gethostname() or "pid" not in worker:
        return False
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return worker.get("start") is not None and _start_time(worker["pid"]) != worker["start"]


def alive(worker: dict) -> bool:
    """A process of this machine that is still running (other machines: unknown, so False)."""
    return worker.get("host") == socket.gethostname() and "pid" in worker and not dead(worker)


def recover(study, storage, max_retry: int = 3) -> list[int]:
    """Fail and requeue the RUNNING trials of dead workers (see the module's docstring); returns the
    numbers of the trials requeued. Safe to call from any number of workers at once: a trial is
    requeued only by the worker whose FAIL of it took effect."""
    import optuna
    from optuna.trial import TrialState

    grace = datetime.timedelta(seconds=storage.grace_period or 2 * (storage.heartbeat_interval or 10))
    now, requeued = datetime.datetime.now(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(T_WORKER)
        orphan = worker is None and t.datetime_start is not None and now - t.datetime_start > grace
        if not (orphan or (worker and dead(worker))):
            continue
        tid = trial_id(storage, study, t.number)
        try:
            if storage.set_trial_state_values(tid, state=TrialState.FAIL):
                if requeue(study, storage.get_trial(tid), stale=True, max_retry=max_retry):
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
