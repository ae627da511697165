"""`study run`: open (or create) the study, recover what killed workers left, run trials until every grid
point / the budget is finished, and end with the report and every MLflow item delivered.

A kill at any moment loses nothing: MLflow's store is complete before anything trains
(`mlflow_store.prepare`), a trial is recovered whatever instant its worker died (`queue`), a finished
trial's checkpoint stays until its MLflow run has every epoch (`Trials.reconcile`), and a complete study
whose report was not handed to MLflow gets it at the next start (`A_REPORT`).
"""
from __future__ import annotations

import gc
import os
import shutil
import signal
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import tracking, uris
from ..figures import fmt
from ..spec import StudySpec
from . import faults
from .attrs import A_PARENT, A_REPORT, A_TRACKING, T_ERROR
from .parent import build_report, open_parent, reported, stage_dir
from .points import top_up
from .progress import Progress, StudyRow, progress, status
from .queue import alive, recover, worker_id
from .storage import open_storage, open_study, public_url, state_dir, study_names
from .trial import Trials

MAX_CONSECUTIVE_FAILURES = 3  # a tune study stops instead of sampling crash after crash
POLL_S = 1.0  # how often a worker with nothing to start looks at the trials other workers run
A_REPORTING = "sweeper.reporting"  # the worker building the report of a completion (others leave it)


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
    parent_status: str | None = None  # how this call ended the parent run (None: left RUNNING)
    report: Path | None = None  # report.md, when this call built the study's report
    failed: int = 0  # trials of this call that failed
    tracking_uri: str | None = None  # the MLflow store this call logged to (with its password, if any)

    @property
    def complete(self) -> bool:
        return self.progress.complete

    @property
    def overhead(self) -> float:
        """Seconds of this call not spent training: outside train(), plus our callback inside it."""
        return self.wall_time - self.train_time + self.callback_time


def resolve_tracking(study_or_none, given: str | None) -> str:
    """The argument, else $MLFLOW_TRACKING_URI, else the URI the study was created with (stored with its
    password masked: `uris.tracking_uri` then asks for the whole URI), else the local store."""
    stored = study_or_none.user_attrs.get(A_TRACKING) if study_or_none is not None else None
    if stored and stored.startswith("sqlite:///") and not os.path.isabs(stored[len("sqlite:///"):]):
        stored = f"sqlite:///{uris.state_path().parent / stored[len('sqlite:///'):]}"
    return tracking.tracking_uri(given or os.environ.get("MLFLOW_TRACKING_URI") or stored)


def _nothing_left(study, spec: StudySpec, report: bool) -> bool:
    """A rerun of a complete study with the same spec has nothing to do when everything is delivered: no
    trial's checkpoint waits for MLflow, nothing is spooled, the report (if asked for) is handed over.
    It then needs neither MLflow nor the trainer (a second instead of five)."""
    from .attrs import A_SPEC

    if study.user_attrs.get(A_SPEC) != spec.to_dict():
        return False  # a changed spec: the full path stores it, or says why it cannot
    prog = progress(study, spec)
    if not prog.complete or prog.running:
        return False
    if report and not reported(study, f"{prog.done}/{prog.total}"):
        return False
    checkpoints, spool = state_dir() / "checkpoints" / spec.name, state_dir() / "spool"
    return not (checkpoints.exists() and any(checkpoints.iterdir())) and not (spool.exists() and any(spool.iterdir()))


def stored_tracking(uri: str) -> str:
    """The tracking URI as the study keeps it: a SQLite file in the state directory relative to the state
    directory's parent (`sqlite:///mlruns/mlflow.db`), so the study finds it from any directory and after
    the project moved; anything else as it is, its password masked."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        base = uris.state_path().parent
        if path.is_absolute() and path.is_relative_to(base):
            return f"sqlite:///{path.relative_to(base)}"
    return public_url(uri)


class Call:
    """One `study run` (or `worker`) call: the loop over trials and the study's end."""

    def __init__(self, study, storage, spec: StudySpec, client, quiet: bool, echo: Callable[[str], None],
                 report: bool):
        self.study, self.storage, self.spec, self.client, self.echo, self.report = study, storage, spec, client, echo, report
        self.parent_recorded = study.user_attrs.get(A_PARENT)
        self.parent = open_parent(client, study, spec, f"{spec.name}/{study.user_attrs.get('sweeper.uid', 'study')}",
                                  storage.url)
        self.trials = Trials(study, storage, spec, client, self.parent, quiet=quiet, echo=echo)
        self.trials.stop_requested = lambda: self.stop_requested
        self.ran = self.completed = self.failed = self.fails_in_row = 0
        self.stop_requested = False  # Ctrl-C between two trials (acted on at the next safe point)
        self.parent_status: str | None = None
        self.report_path: Path | None = None

    def progress(self) -> Progress:
        return progress(self.study, self.spec, self.trials.skip)

    def loop(self, n_trials: int | None) -> None:
        """Start trials until nothing is left to start. With nothing queued but trials running in other
        workers, wait: a dead worker's trial comes back to the queue (`recover`), and this call runs it."""
        spec, max_retry = self.spec, self.spec.heartbeat.max_retry
        while n_trials is None or self.ran < n_trials:
            self.check_stop()
            recover(self.study, self.storage, max_retry)
            prog = self.progress()
            if prog.remaining == 0:
                break
            if spec.kind == "tune" and self.fails_in_row >= MAX_CONSECUTIVE_FAILURES:
                self.echo(f"{self.fails_in_row} trials failed in a row; stopping (fix the cause, then resume)")
                break
            room = prog.queued or (spec.kind == "tune" and prog.done + len(prog.running) < spec.budget)
            if not room:
                if not prog.running:
                    break  # only points that failed in this call are left
                time.sleep(POLL_S)
                continue
            self.trials.study_row = StudyRow(status(self.study, spec))  # before `ask`: the trial is not one of its live ones
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Heartbeat of storage is supposed to be used with optimize": ours is `Heartbeat`
                trial = self.study.ask()
            faults.point("asked")
            state, value = self.trials.run(trial, f"[{min(prog.done + 1, prog.total)}/{prog.total}]")
            self.after_trial(trial.number, state, value)

    def check_stop(self) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt

    def after_trial(self, number: int, state: str, value: float | None) -> None:
        """One summary line per trial; the parent run's progress."""
        self.ran += 1
        self.trials.release()
        self._record_parent()
        frozen = self.study.get_trials(deepcopy=False)[number]
        prog = self.progress()
        metric = self.spec.objective.metric
        secs = frozen.duration.total_seconds() if frozen.duration else 0.0
        if state == "SKIPPED":
            what = f"skipped: {frozen.user_attrs.get('sweeper.skipped')}"
        elif state == "FAIL":
            self.fails_in_row += 1
            self.failed += 1
            what = f"FAIL: {frozen.user_attrs.get(T_ERROR, 'no reason recorded')}"
        else:
            from .attrs import status_of

            self.fails_in_row = 0
            self.completed += 1
            status = status_of(frozen)
            shown = "diverged" if status == "diverged" else f"{metric} {fmt(metric, frozen.value)}"
            what = f"{state} {shown}" + (f" at epoch {frozen.last_step}" if status == "pruned" else "")
        best = f"best {fmt(metric, prog.best[1])}" if prog.best else "no best yet"
        self.echo(f"trial {number} {what}  ({best}; {prog.done}/{prog.total} done; {secs:.1f} s)")
        numbers = {"trials_done": prog.done}
        if prog.best:
            numbers["best_value"] = prog.best[1]
        self.parent.log_metrics(numbers, step=number)
        self.check_stop()  # Ctrl-C came while Optuna recorded this trial: it is recorded now

    def _record_parent(self) -> None:
        if self.parent.run_id and self.parent_recorded != self.parent.run_id:
            self.study.set_user_attr(A_PARENT, self.parent.run_id)
            self.parent_recorded = self.parent.run_id

    def _should_report(self, mark: str) -> bool:
        """Build the report of this completion unless it is built, or another live worker builds it."""
        if reported(self.study, mark):
            return False
        claim = self.study.user_attrs.get(A_REPORTING) or {}
        me = worker_id()
        if claim.get("mark") == mark and claim.get("pid") != me["pid"] and (
                alive(claim) or time.time() - claim.get("time", 0) < 120 and claim.get("host") != me["host"]):
            return False
        self.study.set_user_attr(A_REPORTING, {**me, "mark": mark, "time": time.time()})
        return True

    def close(self, interrupted: bool = False, timeout: float | None = None) -> Progress:
        """End this call's share of the study, then wait (bounded) for every run's items; what is left
        is spooled. The parent run ends FINISHED once the study is complete (with the report), KILLED
        after Ctrl-C, FAILED when trials failed; otherwise it stays RUNNING for the workers still at it
        or the next call."""
        prog = self.progress()
        self.parent.set_tags({"sweeper.progress": f"{prog.done}/{prog.total}"})
        mark, built = f"{prog.done}/{prog.total}", None
        if prog.complete:
            status = "FINISHED"
            if self.report and self._should_report(mark):
                built = self.report_path = build_report(self.study, self.spec, self.parent, self.echo)
        elif prog.running:
            status = None
        elif interrupted:
            status = "KILLED"
        elif self.failed:
            status = "FAILED"
        else:
            status = None
        self.parent_status = status
        self.parent.end(status)
        if timeout is None:
            timeout = float(os.environ.get("SWEEPER_FLUSH_TIMEOUT", 60))
        if prog.complete:
            self.trials.prune_models(timeout)
        loggers = [r.logger for r in self.trials.runs] + [self.parent]
        quick = time.monotonic() + min(2.0, timeout)
        for lg in loggers:  # usually all is delivered by now; say something only when it is not
            lg.join(max(0.0, quick - time.monotonic()))
        where = public_url(self.client.tracking_uri)
        if any(lg.pending for lg in loggers):
            self.echo(f"waiting for MLflow at {where} to take the last items (up to {timeout:.0f} s)")
        spooled = self.client.shutdown(timeout)
        if self.client.error is not None:
            self.echo(f"error: the MLflow store {where} could not be opened: {self.client.error}")
        if spooled:
            self.echo(f"MLflow at {where} did not take everything: {spooled} run(s) spooled under "
                      f"{state_dir() / 'spool'}; the next sweeper command that reaches it delivers them")
        if built is not None and (self.parent.join(0) or self.parent.spooled):
            self.study.set_user_attr(A_REPORT, mark)  # handed to MLflow (delivered, or spooled to be)
        self.trials.release()
        if self.parent.join(0):
            shutil.rmtree(stage_dir(self.spec), ignore_errors=True)
        self._record_parent()
        checkpoints = self.trials.checkpoints
        if prog.complete and checkpoints.exists() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()
        return prog


def run(spec: StudySpec, storage: str | None = None, tracking_uri: str | None = None, n_trials: int | None = None,
        quiet: bool = False, echo: Callable[[str], None] = print, flush_timeout: float | None = None,
        report: bool = True, announce: bool = True) -> Outcome:
    """Run (or continue) a study until every grid point / the budget is finished, or `n_trials` trials
    (0: only create the study, recover what a killed worker left, and open the parent run; `announce`
    says then how to join it). Other processes may run the same study at the same time (`sweeper
    worker`). Ctrl-C or SIGTERM raises Interrupted: the running trial is queued again and its run KILLED."""
    import optuna

    from ..mlflow_store import prepare

    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial says it
    study = call = client = None
    import_time = 0.0
    with _sigterm_as_interrupt():
        try:
            store = open_storage(storage, spec.heartbeat)
            existing = optuna.load_study(study_name=spec.name, storage=store) if spec.name in study_names(store) else None
            uri = resolve_tracking(existing, tracking_uri)
            if existing is not None and n_trials != 0 and _nothing_left(existing, spec, report):
                prog = progress(existing, spec)
                echo(f"study {spec.name} is complete; nothing to run (see `sweeper study status {spec.name}`)")
                return Outcome(existing, spec, 0, prog, existing.user_attrs.get(A_PARENT),
                               time.perf_counter() - started, 0.0, tracking_uri=uri)
            tracking.check_server(uri)  # a dead server is an error now, before anything is created
            prepare(uri)  # MLflow's store complete before anything trains: a kill never leaves half of one
            # All MLflow work happens in this child process. Started before the trainer's import, so that
            # its own imports run beside that one rather than beside the first trial.
            client = tracking.Courier(uri, state_dir() / "spool")
            t_import = time.perf_counter()
            if n_trials != 0:  # (a call that only prepares the study, as `--workers N` does, trains nothing)
                import trainers.train  # noqa: F401 - the trainer's import (torch) is not orchestration: timed apart
            import_time = time.perf_counter() - t_import
            study = open_study(spec, store)
            if study.user_attrs.get(A_TRACKING) != stored_tracking(uri):
                study.set_user_attr(A_TRACKING, stored_tracking(uri))
            call = Call(study, store, spec, client, quiet, echo, report)
            if call.trials.reconcile():
                echo("delivering to MLflow what a previous run of this study left undelivered")
            requeued = recover(study, store, spec.heartbeat.max_retry)
            if requeued:
                echo(f"retrying trial(s) {', '.join(map(str, requeued))} of a previous run that stopped midway")
            if spec.kind == "grid":
                top_up(study, spec)  # failed points of earlier calls: retried now
            setup_time = time.perf_counter() - started - import_time
            remaining = call.progress().remaining
            if remaining == 0:
                echo(f"study {spec.name} is complete; nothing to run (see `sweeper study status {spec.name}`)")
            elif n_trials == 0:
                if announce:
                    echo(f"study {spec.name} is ready: {remaining} trial(s) to run (join it with "
                         f"`sweeper worker {spec.name}` on each machine, or `sweeper study resume {spec.name}`)")
            else:
                # What setup loaded lives as long as the study's process: out of the collector's sight for
                # good, every collection during the trials (and the one at exit) is cheaper.
                gc.freeze()
                with _interrupts(call):
                    call.loop(n_trials)
        except KeyboardInterrupt:
            if call is not None:
                call.close(interrupted=True, timeout=flush_timeout)
            elif client is not None:
                client.shutdown(5.0)
            if study is None:
                raise Interrupted(f"interrupted before study {spec.name} was opened; nothing ran") from None
            raise Interrupted(f"interrupted; {call.completed if call else 0} trial(s) finished in this run. Resume "
                              f"with: sweeper study resume {spec.name}") from None
        except BaseException:
            if client is not None and call is None:
                client.shutdown(5.0)
            raise
    t_close = time.perf_counter()
    try:
        with _deferred_interrupt(echo):  # every trial is done: the end of the study is worth its seconds
            prog = call.close(timeout=flush_timeout)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped while handing the last items to MLflow; the next `sweeper study resume "
                          f"{spec.name}` delivers what is missing (from the trials' checkpoints)") from None
    end = time.perf_counter()
    return Outcome(study, spec, call.ran, prog, call.parent.run_id, end - started - import_time,
                   call.trials.train_time, setup_time, end - t_close, import_time, call.trials.callback_time,
                   call.parent_status, call.report_path, call.failed, client.tracking_uri)


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
def _interrupts(call: Call):
    """Ctrl-C or SIGTERM while the study runs: inside training, KeyboardInterrupt at once; between two
    trials, while Optuna creates or records a trial (a KeyboardInterrupt there would leave it RUNNING with
    nobody behind it), only a request that the next safe point turns into one. A second signal between
    trials interrupts at once."""
    def handler(signum, frame):
        if call.trials.in_trial or call.stop_requested:
            raise KeyboardInterrupt
        call.stop_requested = True
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
