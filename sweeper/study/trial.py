"""One trial: a `train()` call with a per-epoch checkpoint, Optuna reports and a nested MLflow run.

Diverged trials are COMPLETE with the worst possible value (-inf when maximizing) and status "diverged"
in `T_RESULT`: divergence is a measured outcome (Zhang et al. 2021's tables record it), it counts toward the
budget, TPE learns to avoid the region, and it is never retried. FAIL is kept for crashes.
"""
from __future__ import annotations

import math
import shutil
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..run import objective_value, restored_history, trial_summary
from ..tracking import logger_for
from ..spec import StudySpec
from . import faults
from .attrs import (A_RUN_PREFIX, A_UID, S_HISTORY, T_ERROR, T_POINT, T_RESULT, T_RUN, T_SKIPPED, T_WORKER,
                    origin, point_of, status_of)
from .points import suggest
from .queue import alive, recover, worker_id
from .storage import state_dir, trial_id

BUDGET_TAKEN = "the budget is met"
POINT_TAKEN = "another worker runs this grid point"
NOTHING_LEFT = "no grid point left (another worker took the last one)"


class Heartbeat:
    """The trial's heartbeat: one recorded before `start` returns (so a worker record never exists
    without one), then one every `interval` seconds from a thread until `stop`."""

    def __init__(self, storage, tid: int):
        self.storage, self.tid, self._stop = storage, tid, threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Heartbeat":
        interval = self.storage.get_heartbeat_interval()
        if interval:
            self.storage.record_heartbeat(self.tid)
            self._thread = threading.Thread(target=self._beat, args=(interval,), name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.storage.record_heartbeat(self.tid)
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next; a dead DB fails the trial
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class Trials:
    """Runs the trials of one `study run` call and keeps what they leave to deliver."""

    def __init__(self, study, storage, spec: StudySpec, client, parent, quiet: bool = False,
                 echo: Callable[[str], None] = print):
        self.study, self.storage, self.spec, self.client, self.parent = study, storage, spec, client, parent
        self.quiet, self.echo = quiet, echo
        self.runs: list = []  # TrackedRun of every trial of this call, delivered at the end
        self.train_time = self.callback_time = 0.0
        self.skip: set[int] = set()  # grid points that failed in this call: not again now
        # Finished trials whose checkpoint is kept until their MLflow run has everything: the checkpoint's
        # history is the durable copy of the metrics if this process is killed before delivery.
        self.finished: list[tuple[Any, Path, int]] = []
        self.checkpoints = state_dir() / "checkpoints" / spec.name
        # MLflow runs are found again by this key (plus the trial's origin): unique per Optuna study, so a
        # namesake study in another storage, or one deleted and created again, never reuses these runs.
        self.key = f"{spec.name}/{study.user_attrs.get(A_UID, 'study')}"
        self.prunes = spec.kind == "tune" and spec.pruner.name != "none"
        self.in_trial = False  # inside a trial's training (Ctrl-C interrupts at once)
        self.stop_requested: Callable[[], bool] = lambda: False  # a Ctrl-C that came between two trials
        self.study_row = None  # progress.StudyRow: the study's progress beside the trial's
        self.said: set[str] = set()  # the trainer's messages printed in this call (the data source: once)

    # -- one trial ----------------------------------------------------------------------------------

    def run(self, trial, header: str) -> tuple[str, float | None]:
        """Train `trial` and tell Optuna; returns (state name, value). KeyboardInterrupt propagates after
        the trial is failed and queued again (see `interrupted`)."""
        import optuna
        from optuna.trial import TrialState

        tid = trial_id(self.storage, self.study, trial.number)
        beat = Heartbeat(self.storage, tid).start()
        try:
            faults.point("heartbeat")
            trial.set_user_attr(T_WORKER, worker_id())
            frozen = self.storage.get_trial(tid)
            skipped = self._skip_reason(frozen)
            if skipped:
                trial.set_user_attr(T_SKIPPED, skipped)
                self.study.tell(trial, state=TrialState.FAIL)
                return "SKIPPED", None
            try:
                if self.stop_requested():
                    raise KeyboardInterrupt
                try:
                    value = self._train(trial, frozen, header)
                finally:
                    self.in_trial = False
            except optuna.TrialPruned:
                self.study.tell(trial, state=TrialState.PRUNED)
                return "PRUNED", None
            except KeyboardInterrupt:
                self.interrupted(trial.number)
                raise
            except Exception as err:  # noqa: BLE001 - one failed trial does not stop the study
                trial.set_user_attr(T_ERROR, f"{type(err).__name__}: {err}"[:2000])
                self.study.tell(trial, state=TrialState.FAIL)
                if frozen.user_attrs.get(T_POINT) is not None:
                    self.skip.add(frozen.user_attrs[T_POINT])  # rerun by the next `study run`, not now
                return "FAIL", None
            self.study.tell(trial, value)
            return "COMPLETE", value
        finally:
            beat.stop()

    def _skip_reason(self, frozen) -> str | None:
        """Why this trial should not train: its grid point finished or runs in another trial (two workers
        that queued a failed point's retry at the same start), or a tune budget that other workers fill."""
        from optuna.trial import TrialState

        g = frozen.user_attrs.get(T_POINT)
        if g is None and self.spec.kind == "grid":  # `ask` found the queue emptied by another worker
            return NOTHING_LEFT
        if g is not None:
            for t in self.study.get_trials(deepcopy=False):
                if t.number == frozen.number or t.user_attrs.get(T_POINT) != g or t.user_attrs.get(T_SKIPPED):
                    continue
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                        t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < frozen.number):
                    return POINT_TAKEN
            return None
        if self.spec.kind == "tune":
            return self.budget_full(frozen)
        return None

    def budget_full(self, frozen, poll: float = 2.0) -> str | None:
        """Why this tune trial should not run (None: it runs). N workers would otherwise each start one
        more trial when one is missing from the budget, and finish up to N-1 over it.

        Finished trials count, and so do those running with a lower number (of two trials that look at
        once, the lower one runs, so the budget's last trial is never skipped by both). While the budget
        is full only if those finish, this trial waits and looks again: one failing, or its worker dying,
        leaves room for it."""
        from optuna.trial import TrialState

        budget = self.spec.budget
        while True:
            trials = self.study.get_trials(deepcopy=False)
            done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
            ahead = sum(t.state == TrialState.RUNNING and t.number < frozen.number for t in trials)
            if done >= budget:
                return BUDGET_TAKEN
            if done + ahead < budget:
                return None
            time.sleep(poll)
            recover(self.study, self.storage, self.spec.heartbeat.max_retry)

    def _train(self, trial, frozen, header: str) -> float:
        from trainers.results import TrainResult
        from trainers.train import train

        from ..run import TrackedRun, progress_bar

        spec = self.spec
        self.in_trial = True
        params = suggest(trial, spec)
        cfg = spec.config(params)
        first = origin(frozen)
        run = TrackedRun(self.client, spec.name, key=f"{self.key}/{first}", run_name=f"{first:03d} {spec.label(params)}",
                         parent=self.parent, run_id=self._known_run(frozen),
                         tags={"sweeper.study": spec.name, "optuna.origin_trial": first})
        run.origin = first
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
        resumed = f" (retry of trial {first}, from epoch {len(restored)})" if first != trial.number else ""
        self.echo(f"trial {trial.number} {header} {spec.label(params)}{resumed}")
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
            with progress_bar(cfg.epochs, enabled=not self.quiet, study=self.study_row) as (on_progress, on_line, log):
                result = train(cfg, on_epoch=on_epoch, checkpoint_dir=ckpt, on_progress=on_progress,
                               log=run.data_log(self._once(log)))
        except KeyboardInterrupt:
            self._record_run(trial, run, wait=2.0)
            run.end("KILLED", {"optuna.state": "INTERRUPTED"})
            raise
        except Exception as err:
            self.train_time += time.perf_counter() - t0
            import optuna

            if isinstance(err, optuna.TrialPruned):
                pruned = TrainResult(status="completed", epochs_completed=len(reports), history=reports,
                                     total_time=time.perf_counter() - t0, device=str(cfg.device))
                self._finish(trial, run, pruned, "PRUNED", status="pruned", cfg=cfg)
                self.finished.append((run, ckpt, first))
                raise
            why = f"{type(err).__name__}: {err}"
            (run.stage / "traceback.txt").write_text(traceback.format_exc())  # the console gets one line
            run.logger.log_artifact(run.stage / "traceback.txt")
            self._record_run(trial, run, wait=2.0)
            run.end("FAILED", {"optuna.state": "FAIL", "sweeper.error": why[:5000]})
            raise
        self.train_time += time.perf_counter() - t0
        value = objective_value(spec, result)
        keep, pushed_out = self._keeps_model(trial.number, value)
        self._finish(trial, run, result, "COMPLETE", status=result.status, cfg=cfg,
                     ckpt=ckpt if result.status == "completed" and keep else None, objective=value)
        for run_id in pushed_out:  # its model is no longer among the best k: the registry keeps k
            self.runs.append(_ModelDrop(logger_for(self.client, run_id)))
        self.finished.append((run, ckpt, first))  # the checkpoint goes once MLflow has every epoch (see release)
        return value

    def _once(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """`log` for the trainer's messages, each printed once per call: every trial loads the same data."""
        def say(message) -> None:
            if str(message) not in self.said:
                self.said.add(str(message))
                log(message)
        return say

    def interrupted(self, number: int) -> None:
        """Ctrl-C: the running trial is failed and queued again, so a resume continues it."""
        import optuna
        from optuna.trial import TrialState

        from .queue import requeue

        tid = trial_id(self.storage, self.study, number)
        try:
            if self.storage.get_trial(tid).state == TrialState.RUNNING:
                self.storage.set_trial_state_values(tid, state=TrialState.FAIL)
            frozen = self.storage.get_trial(tid)
            if frozen.state == TrialState.FAIL:
                requeue(self.study, frozen, stale=False)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

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

    def _keeps_model(self, number: int, value: float | None) -> tuple[bool, list[str]]:
        """Whether trial `number`, finishing with `value`, logs its model, and the runs whose model it
        pushes out of the best `keep_models` (none while the spec keeps every trial's)."""
        from optuna.trial import TrialState

        k = self.spec.keep_models
        if k is None:
            return True, []
        if value is None or not math.isfinite(value):
            return False, []
        sign = -1 if self.spec.objective.direction == "maximize" else 1
        runs = self._run_ids()
        others = sorted((sign * t.value, t.number, runs.get(origin(t))) for t in self.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE,)) if t.number != number and t.value is not None
            and math.isfinite(t.value) and t.user_attrs.get(T_RESULT, {}).get("status") == "completed")
        rank = sum(1 for v, n, _ in others if (v, n) < (sign * value, number))
        if rank >= k:
            return False, []
        return True, [r for _, _, r in others[k - 1:k] if r]

    def prune_models(self, timeout: float) -> None:
        """At the study's end, once this call's runs are delivered (a model still being logged would outlive
        its deletion): the models of the trials outside the best `keep_models` are deleted."""
        from optuna.trial import TrialState

        k = self.spec.keep_models
        if k is None:
            return
        deadline = time.monotonic() + timeout
        for run in self.runs:
            run.logger.join(max(0.0, deadline - time.monotonic()))
        sign = -1 if self.spec.objective.direction == "maximize" else 1
        runs = self._run_ids()
        ranked = sorted((sign * t.value, t.number, runs.get(origin(t))) for t in self.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None and math.isfinite(t.value))
        for _, _, run_id in ranked[k:]:
            if run_id:
                self.runs.append(_ModelDrop(logger_for(self.client, run_id)))

    def _run_ids(self) -> dict[int, str]:
        """The MLflow run of each retry chain (by its first trial) known now: recorded with the trials, with
        the study (a run opened after its trial ended), or opened by this call."""
        runs = {int(k[len(A_RUN_PREFIX):]): v for k, v in self.study.user_attrs.items() if k.startswith(A_RUN_PREFIX)}
        for t in self.study.get_trials(deepcopy=False):
            if T_RUN in t.user_attrs:
                runs[origin(t)] = t.user_attrs[T_RUN]
        for run in self.runs:
            if getattr(run, "origin", None) is not None and run.run_id:
                runs[run.origin] = run.run_id
        return runs

    def _known_run(self, frozen) -> str | None:
        """The MLflow run of the retry chain, if a previous attempt recorded it."""
        if T_RUN in frozen.user_attrs:
            return frozen.user_attrs[T_RUN]
        recorded = self.study.user_attrs.get(f"{A_RUN_PREFIX}{origin(frozen)}")
        if recorded:
            return recorded
        for number in reversed(frozen.system_attrs.get(S_HISTORY, [])):
            t = self.storage.get_trial(trial_id(self.storage, self.study, number))
            if T_RUN in t.user_attrs:
                return t.user_attrs[T_RUN]
        return None  # the run is then found by its key tag, or created

    def _record_run(self, trial, run, wait: float = 0.0) -> None:
        """Keep the trial's MLflow run id with the trial (a retry reuses it)."""
        if wait:
            run.logger.wait_open(wait)
        if run.run_id and getattr(run, "recorded", None) != run.run_id:
            trial.set_user_attr(T_RUN, run.run_id)
            run.recorded = run.run_id

    def _finish(self, trial, run, result, state: str, status: str, cfg=None, ckpt=None,
                objective: float | None = None) -> None:
        from ..run import curves

        trial.set_user_attr(T_RESULT, {"status": status, "summary": trial_summary(result.history, status),
                                       "curves": curves(result.history)})
        self._record_run(trial, run, wait=2.0)  # normally long opened; returns at once during an outage
        run.finish(result, {"optuna.state": state, "optuna.trial_number": trial.number, "sweeper.status": status},
                   title=f"{self.spec.name} trial {trial.number}: {self.spec.label(point_of(trial, self.spec))}",
                   cfg=cfg, checkpoint_dir=ckpt, objective=objective)

    # -- after trials -------------------------------------------------------------------------------

    def reconcile(self) -> int:
        """Deliver what a killed process left undelivered for trials it finished: their checkpoint is
        still there (see `finished`), so every epoch, the final figures and the run's end are logged
        from it (only what the run lacks), then the checkpoint goes."""
        from optuna.trial import TrialState
        from trainers.results import TrainResult

        from ..run import TrackedRun

        spec, n = self.spec, 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            ckpt = self.checkpoints / str(origin(t))
            history = restored_history(ckpt)
            if not history or alive(t.user_attrs.get(T_WORKER) or {}):
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
            run.origin = origin(t)
            self.runs.append(run)
            self.finished.append((run, ckpt, origin(t)))
            n += 1
        return n

    def release(self, timeout: float = 0.0) -> None:
        """Delete the checkpoints (and staged artifacts) of finished trials whose runs are delivered, and
        record the run ids that became known only after their trial finished (during an outage)."""
        keep = []
        for run, ckpt, first in self.finished:
            if run.logger.join(timeout):  # all delivered: MLflow has every epoch now
                if run.run_id and getattr(run, "recorded", None) != run.run_id:
                    self.study.set_user_attr(f"{A_RUN_PREFIX}{first}", run.run_id)
                    run.recorded = run.run_id
                shutil.rmtree(ckpt, ignore_errors=True)
                shutil.rmtree(run.stage, ignore_errors=True)
            else:
                keep.append((run, ckpt, first))
        self.finished = keep


class _ModelDrop:
    """A delivery like a trial's (waited for and spooled with them): delete the MLflow model of a run."""

    def __init__(self, logger):
        self.logger = logger
        logger.drop_models()
        logger.end(None)
