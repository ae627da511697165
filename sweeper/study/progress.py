"""Where a study stands: trials by state, points finished out of the total, the best point so far."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

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
    from optuna.trial import TrialState

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
