"""What a trial runs: a grid study queues each of its points as a WAITING trial (spec order), which
`study.ask()` pops one at a time, atomically across workers; a tune study samples with TPE. Pruning is
Optuna's median pruner on the per-epoch reports of the objective."""
from __future__ import annotations

import warnings
from typing import Any

from ..spec import SEED_KEY, Choices, StudySpec, encode
from .attrs import S_HISTORY, S_ORIGIN, T_POINT, T_RUN, T_SKIPPED, origin


def make_sampler(spec: StudySpec):
    import optuna

    if spec.kind == "grid":  # every trial comes from the queue; nothing is sampled
        return optuna.samplers.RandomSampler(seed=0)
    s = spec.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate is "experimental"
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=s.multivariate)


def make_pruner(spec: StudySpec):
    import optuna

    p = spec.pruner
    if spec.kind == "grid" or p.name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps,
                                       interval_steps=p.interval_steps)


def grid_distributions(spec: StudySpec) -> dict:
    from optuna.distributions import CategoricalDistribution

    return {key: CategoricalDistribution(values) for key, values in spec.grid_space().items()}


def points_state(study, spec: StudySpec) -> tuple[set[int], set[int], dict[int, list]]:
    """Grid point indices finished (COMPLETE/PRUNED), queued or running, and failed (their trials)."""
    from optuna.trial import TrialState

    done, busy, failed = set(), set(), {}
    for t in study.get_trials(deepcopy=False):
        g = t.user_attrs.get(T_POINT)
        if g is None or t.user_attrs.get(T_SKIPPED):
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            done.add(g)
        elif t.state in (TrialState.RUNNING, TrialState.WAITING):
            busy.add(g)
        elif t.state == TrialState.FAIL:
            failed.setdefault(g, []).append(t)
    return done, busy, failed


def top_up(study, spec: StudySpec) -> list[int]:
    """Queue every grid point that has no finished, queued or running trial: all of them when the study
    is new, those a killed creation did not queue, and failed ones, each as a retry of its first trial
    (same checkpoint and MLflow run). Returns the indices queued."""
    import optuna

    done, busy, failed = points_state(study, spec)
    space, dists, queued = spec.grid_space(), grid_distributions(spec), []
    for g, point in enumerate(spec.points()):
        if g in done or g in busy:
            continue
        user: dict[str, Any] = {T_POINT: g}
        system: dict[str, Any] = {}
        chain = sorted(failed.get(g, []), key=lambda t: t.number)
        if chain:
            system = {S_ORIGIN: origin(chain[0]), S_HISTORY: [t.number for t in chain]}
            runs = [t.user_attrs[T_RUN] for t in chain if T_RUN in t.user_attrs]
            if runs:
                user[T_RUN] = runs[-1]
        params = {key: encode(point[key]) for key in space}
        study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.WAITING, params=params,
                                            distributions=dists, user_attrs=user, system_attrs=system))
        queued.append(g)
    return queued


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
