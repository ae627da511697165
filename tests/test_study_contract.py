"""What the study layer takes from Optuna beyond its documented calls, checked against the installed
version (setup.cfg bounds its major version): the SQLAlchemy engine Optuna queries through, the queue's
pop, heartbeats and the stale-trial callback."""
from __future__ import annotations

import time
import warnings

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import event

from sweeper import study as st


def test_our_sqlite_listener_sees_optunas_transactions(workdir):
    storage = st.open_storage()
    begun = []
    event.listen(storage.engine, "begin", lambda connection: begun.append(1))
    optuna.create_study(study_name="contract", storage=storage)
    assert begun  # the engine we serialize (BEGIN IMMEDIATE) is the one Optuna's queries use


def test_ask_pops_a_queued_trial_with_its_params_and_attrs(workdir):
    storage = st.open_storage()
    study = optuna.create_study(study_name="queue", storage=storage)
    dist = optuna.distributions.CategoricalDistribution([0.1, 0.2])
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, params={"lr": 0.2}, distributions={"lr": dist},
                                        user_attrs={st.T_POINT: 1}, system_attrs={st.S_ORIGIN: 7}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial = study.ask()
    assert trial.suggest_categorical("lr", [0.1, 0.2]) == 0.2
    frozen = study.trials[0]
    assert frozen.state == TrialState.RUNNING and frozen.user_attrs[st.T_POINT] == 1 and st.origin(frozen) == 7
    tid = st.trial_id(storage, study, 0)
    assert storage.set_trial_state_values(tid, TrialState.RUNNING) is False  # taken: a second pop fails


@pytest.mark.slow
def test_a_stale_heartbeat_fails_the_trial_and_calls_our_callback(workdir, monkeypatch):
    monkeypatch.setenv("SWEEPER_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("SWEEPER_HEARTBEAT_GRACE", "1")
    storage = st.open_storage()
    assert storage.get_heartbeat_interval() == 1 and storage.grace_period == 1
    study = optuna.create_study(study_name="beat", storage=storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial = study.ask()
    storage.record_heartbeat(st.trial_id(storage, study, trial.number))
    time.sleep(2.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]  # (st.Requeue)
