"""`sweeper study ...`: run, resume, inspect and report studies. Heavy imports happen inside commands."""
from __future__ import annotations

import json
import math
import sys

import click

STORAGE_HELP = ("Optuna storage URL (any RDB URL) [default: $SWEEPER_STORAGE, else optuna.db in the state "
                "directory].")
TRACKING_HELP = ("MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else the one the study was created with, "
                 "else mlflow.db in the state directory].")


def storage_option(f):
    return click.option("--storage", default=None, metavar="URL", help=STORAGE_HELP)(f)


WORKERS_HELP = ("Run N worker processes on this machine that share the study [default: 1]. The SQLite storage "
                "(the default) serves the processes of one machine, with the state directory on a local disk "
                "(its locks do not hold over NFS); workers on several machines need a PostgreSQL --storage.")


SET_HELP = ("Change the spec: KEY=VALUE, VALUE parsed as YAML (repeatable). KEY's first part is the spec's "
            "top-level key; under grid/search the rest is the dimension's key (grid.optim.lr=[0.01,0.1]), "
            "under base a config key (base.epochs=2); seeds=[0,1]. Stored with the study.")
NAME_HELP = "The study's name (a new study from this spec, e.g. with --set changing what its trials are)."


def run_options(f):
    f = click.option("--name", "new_name", default=None, metavar="NAME", help=NAME_HELP)(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(f)
    f = click.option("--quiet", "-q", is_flag=True, help="No per-epoch progress; one line per trial.")(f)
    f = click.option("--no-report", is_flag=True,
                     help="Do not build the report when this run completes the study (see `study report`).")(f)
    f = click.option("--workers", type=click.IntRange(min=1), default=1, metavar="N", help=WORKERS_HELP)(f)
    f = click.option("--n-trials", type=click.IntRange(min=0), default=None,
                     help="Run at most N trials now (per worker) [default: until every grid point / the budget "
                          "is done]; 0 only creates the study (for workers to join).")(f)
    f = click.option("--tracking-uri", default=None, metavar="URI", help=TRACKING_HELP)(f)
    return storage_option(f)


@click.group()
def study() -> None:
    """Studies: grids and tuning driven by Optuna, tracked in MLflow, resumable after a kill.

    \b
    sweeper study run studies/quickstart.yaml     run it (again after a kill: completes it)
    sweeper study run SPEC --workers 4            4 processes on this machine share it
    sweeper study status quickstart               progress, best so far, what runs
    sweeper study report quickstart               tables + plots in mlruns/reports/quickstart/
    sweeper server                                the MLflow UI (experiment = study name)

    State lives in the state directory: $SWEEPER_STATE_DIR, else the nearest mlruns/ in the working
    directory or above it (as git finds .git), else ./mlruns, created by `study run`, `train`, `server`
    (and `worker` given a --storage). It holds optuna.db, mlflow.db, checkpoints/, spool/ and
    reports/NAME/ (written by `study run` when the study completes, and by `study report`). Commands
    that need an existing study (`study list/status/report/delete/resume`, `worker`) stop with an
    error when there is no state directory and no --storage. --storage takes any Optuna RDB URL
    (PostgreSQL for workers on many machines: `sweeper worker NAME --storage URL` on each),
    --tracking-uri any MLflow server. Heartbeat: SWEEPER_HEARTBEAT_INTERVAL / SWEEPER_HEARTBEAT_GRACE (s).
    """


@study.command("run")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@run_options
def run_cmd(spec_path, storage, tracking_uri, n_trials, workers, no_report, quiet, overrides, new_name):
    """Run the study of SPEC (YAML), or continue it: running the same command again after a kill
    completes what is missing and repeats nothing. The report is built when the study completes.
    --set changes the spec (the changed spec and the --set items are stored with the study; continue
    it with `sweeper study resume NAME`)."""
    from .spec import load_spec_with

    with _errors():
        spec = load_spec_with(spec_path, overrides, new_name)
        _run(spec, storage, tracking_uri, n_trials, quiet, workers, not no_report,
             again=None if (overrides or new_name) else f"sweeper study run {spec_path}")


@study.command()
@click.argument("name")
@run_options
def resume(name, storage, tracking_uri, n_trials, workers, no_report, quiet, overrides, new_name):
    """Continue study NAME from its stored spec (no file needed). --set may change what does not
    decide its trials (budget, heartbeat, ...); a change of its trials needs --name NEW (a new study)."""
    with _errors():
        spec = _stored_spec(name, storage, overrides, new_name)
        _run(spec, storage, tracking_uri, n_trials, quiet, workers, not no_report)


@click.command()
@click.argument("name")
@run_options
@click.option("--relayed", is_flag=True, hidden=True,
              help="Started by `study run --workers N`, which prints the study's summary and how to resume: "
                   "print only the trials' lines.")
def worker(name, storage, tracking_uri, n_trials, workers, no_report, quiet, overrides, new_name, relayed):
    """Join study NAME as one of many workers (e.g. one per machine or GPU over a PostgreSQL --storage):
    each takes the next grid point / TPE sample, a killed one's trial is retried by the others after
    its heartbeat goes stale, and each exits when nothing is left to start. The worker that finishes
    the study's last trial ends its parent MLflow run and builds the report. --set / --name: as for
    `study resume`."""
    global _RELAYED
    _RELAYED = relayed
    with _errors():
        spec = _stored_spec(name, storage, overrides, new_name)
        _run(spec, storage, tracking_uri, n_trials, quiet, workers, not no_report,
             again=f"sweeper worker {spec.name}", relayed=relayed)


def _stored_spec(name, storage, overrides, new_name):
    """The spec stored with study NAME, with --set OVERRIDES and --name NEW_NAME applied."""
    from .spec import with_overrides
    from .study import load, open_storage

    _require_state(storage)
    _, spec = load(name, open_storage(storage))
    if overrides or new_name:
        spec = with_overrides(spec.to_dict(), overrides, f"study {name} (stored spec)", new_name)
    return spec


TRIALS_FAILED = 3  # exit status of a relayed worker whose study is not complete because trials failed
_RELAYED = False  # this process is a worker of `study run --workers N`: its parent tells the study's story


def _run(spec, storage, tracking_uri, n_trials, quiet, workers=1, report=True, again=None, relayed=False) -> None:
    from .study import run

    what = f"{len(spec.points())} grid points" if spec.kind == "grid" else f"budget {spec.budget} trials"
    if not relayed:
        click.echo(f"study {spec.name} ({spec.kind}, {what}; {spec.objective.direction} {spec.objective.metric})")
    if workers > 1 and n_trials != 0 and not relayed:  # (--n-trials 0 only creates the study)
        return _run_workers(spec, storage, tracking_uri, n_trials, workers, report, again, quiet)
    out = run(spec, storage=storage, tracking_uri=tracking_uri, n_trials=n_trials, quiet=quiet, echo=click.echo,
              report=report, announce=not relayed)
    p = out.progress
    if relayed:  # one line of this worker's share; the summary is the parent's
        click.echo(f"worker done: {out.ran} trial(s) here" + (f", {out.failed} failed" if out.failed else "")
                   + f" in {out.wall_time:.1f} s")
        if not (p.complete or (n_trials is not None and out.failed == 0)):
            raise SystemExit(TRIALS_FAILED)
        return
    _summary(spec, p, out.parent_run_id, out.report)
    if out.ran:
        over = out.overhead
        per_trial = (over - out.setup_time - out.close_time) / out.ran
        click.echo(f"time: {out.wall_time:.1f} s, {out.train_time - out.callback_time:.1f} s of it training; "
                   f"orchestration (Optuna, MLflow) {over:.1f} s = "
                   f"{100 * over / max(out.wall_time, 1e-9):.1f}% (setup {out.setup_time:.1f} s, {per_trial:.2f} s "
                   f"per trial, final delivery {out.close_time:.2f} s)")
    _exit_status(spec, p, n_trials, out.failed)


def _exit_status(spec, p, n_trials, failed: int | None, resume: str | None = None) -> None:
    """Exit 0 when the study is complete, or when a run limited by --n-trials had no failure; else say
    what is missing and exit 1. (`failed`: this run's failed trials; None: counted by other processes.)"""
    if p.complete or (n_trials is not None and failed == 0):
        return
    resume = resume or f"sweeper study resume {spec.name}"
    why = (f"{failed} trial(s) failed in this run (the FAIL lines above say why)" if failed else
           "trials failed (the FAIL lines above say why)")
    click.echo(f"study {spec.name} is not complete ({p.done}/{p.total} done): {why}; fix the cause, then "
               f"`{resume}` retries them", err=True)
    raise SystemExit(1)


def _summary(spec, p, parent_run_id, report) -> None:
    from .figures import fmt

    best = (f"; best {spec.objective.metric} {fmt(spec.objective.metric, p.best[1])} at {spec.label(p.best[0])}"
            if p.best else "")
    click.echo(f"study {spec.name}: {p.done}/{p.total} done" + (f", {p.diverged} diverged" if p.diverged else "")
               + best)
    where = (f"report: {report} (also on the parent run, artifacts/report)" if report else
             f"tables and plots: sweeper study report {spec.name}")
    click.echo(f"MLflow: experiment '{spec.name}', parent run {parent_run_id}; {where}")


def _run_workers(spec, storage, tracking_uri, n_trials, workers, report, again, quiet=False) -> None:
    from .study import Interrupted
    from .uris import secrets
    from .workers import run_workers

    out = run_workers(spec, workers, storage=storage, tracking_uri=tracking_uri, n_trials=n_trials, report=report,
                      quiet=quiet, echo=click.echo)
    p = out.progress
    _summary(spec, p, out.prepared.parent_run_id, out.report)
    resume = (f"{again or f'sweeper study resume {spec.name}'} --workers {workers}"
              + (f" --storage {storage}" if storage and not secrets(storage) else
                 " (with SWEEPER_STORAGE set to the storage URL)" if storage else ""))
    crashed = [i for i in out.failed if out.codes[i - 1] != TRIALS_FAILED]  # not: their trials failed
    trials_failed = len(crashed) < len(out.failed)
    failed = ("worker(s) " + ", ".join(f"{i} (exit status {out.codes[i - 1]})" for i in crashed)
              + " stopped with an error; their output is above (prefixed [wI])") if crashed else None
    if out.interrupted and not (p.done >= p.total and not p.running):
        if failed:
            click.echo(failed, err=True)
        raise Interrupted(f"interrupted; {p.done}/{p.total} done. Resume with: {resume}")
    if failed:
        if p.complete:
            click.echo(f"{failed}; the other workers completed the study", err=True)
            return
        click.echo(failed, err=True)
    _exit_status(spec, p, n_trials, None if (failed or trials_failed or not n_trials) else 0, resume)


@study.command()
@click.argument("name")
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with --watch: one per refresh).")
@click.option("--watch", "-w", "watch", is_flag=False, flag_value=5.0, default=None, type=click.FloatRange(min=0.5),
              metavar="[SECONDS]", help="Refresh every SECONDS [5] until the study is complete or Ctrl-C.")
def status(name, storage, as_json, watch):
    """Trials of study NAME by state (STALE: RUNNING, but its worker is gone or its heartbeat is older than
    the grace; the next worker retries it), the best so far, elapsed time and ETA, what is running."""
    from .study.progress import snapshot, status as study_status, status_lines

    def read():
        with _errors():
            _require_state(storage)
            view, spec = snapshot(name, storage)
            return study_status(view, spec)

    s = read()
    if watch is None:
        return _show_status(s, as_json, status_lines)
    live = None
    if not as_json and sys.stdout.isatty():
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        render = lambda s: Text("\n".join(status_lines(s) + (  # noqa: E731
            [] if s.progress.complete else [f"(every {watch:g} s; Ctrl-C stops)"])))
        live = Live(render(s), console=Console(), auto_refresh=False)
        live.start()
    try:
        while True:
            if live is None:
                _show_status(s, as_json, status_lines)
            if s.progress.complete:
                break
            _wait(watch)
            s = read()
            if live is not None:
                live.update(render(s), refresh=True)
            elif not as_json:
                click.echo("")
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()


def _wait(seconds: float) -> None:
    import time

    time.sleep(seconds)


def _show_status(s, as_json, lines) -> None:
    if as_json:
        click.echo(json.dumps(s.to_dict(), default=str))
    else:
        for line in lines(s):
            click.echo(line)


@study.command("list")
@storage_option
def list_cmd(storage):
    """Every study in the storage, with its progress and best value."""
    from .spec import SpecError
    from .figures import fmt
    from .study.progress import names, progress, snapshot

    with _errors():
        _require_state(storage)
        found = names(storage)
        if not found:
            from .study import public_url, storage_url

            click.echo(f"no studies in {public_url(storage_url(storage))}; start one with "
                       f"`sweeper study run studies/quickstart.yaml`")
            return
        for name in found:
            try:
                st, spec = snapshot(name, storage)
            except SpecError as err:
                click.echo(f"{name:<32} ({err})")
                continue
            p = progress(st, spec)
            best = fmt(spec.objective.metric, p.best[1]) if p.best and math.isfinite(p.best[1]) else "-"
            click.echo(f"{name:<32} {spec.kind:<5} {p.done:>4}/{p.total:<4} best {spec.objective.metric} {best}"
                       + (f"  running {len(p.running)}" if p.running else ""))


@study.command()
@click.argument("name")
@storage_option
@click.option("--tracking-uri", default=None, metavar="URI", help=TRACKING_HELP)
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Where to write the tables and plots [default: reports/NAME in the state directory, where "
                   "`study run` writes it].")
@click.option("--format", "fmt", type=click.Choice(["md", "csv"]), default="md", show_default=True)
@click.option("--no-log", is_flag=True, help="Do not log the report to the study's parent MLflow run.")
def report(name, storage, tracking_uri, out_dir, fmt, no_log):
    """Tables (shaped like the sources' where the study's keys fit) and plots of study NAME, written to
    reports/NAME/ in the state directory (as `study run` does when the study completes) or to --out."""
    with _errors():
        _require_state(storage)
    from .report import log_report, write_report
    from .study import A_PARENT, load, open_storage
    from .study.run import resolve_tracking
    from .study.storage import report_dir
    from .tracking import TrackingError, connect, replay_spool
    from .uris import public, redact

    with _errors():
        st, spec = load(name, open_storage(storage))
        paths = write_report(st, spec, out_dir or report_dir(name), fmt)
    for path in paths:
        click.echo(str(path))
    parent = st.user_attrs.get(A_PARENT)
    if no_log or not parent:
        return
    try:
        client = connect(resolve_tracking(st, tracking_uri))
        replay_spool(client)  # what a run could not deliver, before the report lands beside it
        log_report(client, parent, paths)
        click.echo(f"logged to MLflow run {parent} (artifacts/report) at {public(client.tracking_uri)}")
    except (TrackingError, Exception) as err:  # noqa: BLE001 - the files are written; logging is a bonus
        click.echo(f"warning: report not logged to MLflow: {redact(str(err).splitlines()[0], tracking_uri)}", err=True)


@study.command()
@click.argument("name")
@storage_option
@click.option("--tracking-uri", default=None, metavar="URI", help=TRACKING_HELP)
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
def delete(name, storage, tracking_uri, yes):
    """Delete study NAME: its Optuna trials, its MLflow experiment and runs, its checkpoints and reports."""
    with _errors():
        _require_state(storage)
    from .study import open_storage, public_url
    from .study.delete import delete as remove, plan

    with _errors():
        store = open_storage(storage)
        doomed, client = plan(name, store, tracking_uri)
    what = (f"study {name} ({doomed.trials} trials) in {public_url(store.url)}, "
            + (f"MLflow experiment '{name}' ({doomed.runs} runs) at {public_url(doomed.tracking_uri)}"
               if doomed.experiment_id else "no MLflow experiment")
            + (f", {len(doomed.paths)} local folder(s): " + ", ".join(map(str, doomed.paths)) if doomed.paths else ""))
    if not yes:
        click.confirm(f"Delete {what}?", abort=True)
    with _errors():
        remove(doomed, store, client)
    click.echo(f"deleted {what}")


@study.command()
@click.argument("spec_paths", metavar="SPEC...", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate(spec_paths):
    """Check specs without running anything: every grid point / search corner builds a valid config."""
    from .spec import load_spec

    with _errors():
        for path in spec_paths:
            spec = load_spec(path)
            n = len(spec.points()) if spec.kind == "grid" else spec.budget
            click.echo(f"{path}: ok ({spec.name}, {spec.kind}, {n} trials)")


def _require_state(storage: str | None) -> None:
    """A command that reads a study stops here when there is no store to read (it creates none)."""
    from .uris import require_state

    require_state(storage)


class _errors:
    """Spec, config, data and tracking problems as one `error:` line; Ctrl-C as a resume hint."""

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        from .cli import CLIError, user_errors  # here: `python -m sweeper.cli` imports this module from cli
        from .study import Interrupted

        if err is None:
            return False
        if isinstance(err, Interrupted):
            # A relayed worker says what it did; how to resume is its parent's line (one command, not N).
            click.echo(str(err).split(" Resume with:")[0].split(". Resume")[0] if _RELAYED else str(err), err=True)
            raise SystemExit(130)
        if isinstance(err, user_errors()):
            raise CLIError(str(err)) from None
        return False
