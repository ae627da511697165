"""`--workers N`: N worker processes on this machine that join one study, the way `sweeper worker` joins
it from any machine.

This process only prepares the study (creates it, requeues what a killed run left, opens the parent
MLflow run), starts N `sweeper worker NAME` processes on the same storage and tracking URI, prints their
lines prefixed `[wI]`, and waits. Grid points run exactly once across them and each trial is one child
run of the study's one parent run (see `study.py`); the worker that finishes the study's last trial
ends the parent run and builds the report.

Ctrl-C (or SIGTERM) here is passed on once to every worker as SIGINT: each stops like an interrupted
`study run` (its running trial queued again, its MLflow runs KILLED); a second Ctrl-C kills them (the
next run retries their trials at once: their pids are gone). Each worker runs in its own process group,
so a terminal's Ctrl-C reaches them only through here, exactly once, and dies with this process
(PR_SET_PDEATHSIG on Linux) rather than writing to a closed pipe.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .spec import SpecError, StudySpec
from .study import A_REPORT, Outcome, progress, public_url, run, state_dir, storage_url
from .study.storage import report_dir


@dataclass
class WorkersOutcome:
    prepared: Outcome  # the preparation in this process (no trial ran here)
    progress: object  # study.Progress after the workers exited
    codes: list[int] = field(default_factory=list)  # exit status of each worker (negative: killed by signal)
    interrupted: bool = False
    report: Path | None = None  # report.md, when the study is complete and its report was built

    @property
    def failed(self) -> list[int]:
        """Workers (1-based) that ended with an error rather than done or interrupted."""
        return [i for i, rc in enumerate(self.codes, 1) if rc not in (0, 130) and not (self.interrupted and rc < 0)]


def check_storage(url: str, workers: int) -> None:
    """Storages that N processes cannot share are an error here, before anything starts."""
    if workers > 1 and url.startswith("sqlite:") and (url in ("sqlite://", "sqlite:///") or ":memory:" in url):
        raise SpecError(f"--workers {workers}: the storage {url} is an in-memory SQLite database, which other "
                        f"processes cannot open; use a file (the default sqlite:///{state_dir()}/optuna.db) or "
                        f"a PostgreSQL URL")


def worker_env(index: int, workers: int, gpus: int) -> dict[str, str]:
    """The environment of worker `index` (0-based): the CPU's cores split between the workers unless
    OMP_NUM_THREADS is set (N workers x all cores each oversubscribe a CPU many times over), and, on a
    machine with several GPUs and no CUDA_VISIBLE_DEVICES, one GPU each in turn."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in env:
        env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _gpu_count() -> int:
    if sys.platform.startswith("linux") and not Path("/proc/driver/nvidia/gpus").exists():
        return 0  # no NVIDIA driver: no CUDA device, known without importing torch (seconds)
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA: the workers run where the config says
        return 0


def _libc():
    """Linux's C library, for prctl (loaded here, before any fork: the child may only make calls)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def _child_setup(libc) -> Callable[[], None]:
    """What each worker does between fork and exec: its own process group (Ctrl-C reaches it from us,
    once), SIGINT's default action back (a shell starts background jobs with SIGINT ignored, and Python
    then never turns it into KeyboardInterrupt), and SIGTERM when we die (PR_SET_PDEATHSIG), which it
    handles like Ctrl-C, rather than going on with nobody to read its output."""
    def setup() -> None:
        os.setpgrp()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if libc is not None:
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    return setup


TRIAL_HEADER = re.compile(r"^(trial \d+) \[\d+/\d+\]")


class Board:
    """The workers' lines: in a terminal, a live row per worker (its trial, its last epoch with the
    study's ETA) under the lines they print; elsewhere every line, prefixed `[wI]`."""

    def __init__(self, workers: int, echo: Callable[[str], None], live: bool, console=None):
        self.echo, self.live = echo, None
        self.rows = {i: f"[w{i}] starting" for i in range(1, workers + 1)}
        self.trial = {i: "" for i in self.rows}
        if live:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self._render(), console=console or Console(), refresh_per_second=2, transient=True)
            self.live.start()

    def _render(self):
        from rich.text import Text

        return Text("\n".join(self.rows.values()), no_wrap=True, overflow="ellipsis")

    def line(self, i: int, text: str) -> None:
        started = TRIAL_HEADER.match(text)  # "trial 7 [3/8] optim=...": the worker starts trial 7
        if started:
            self.trial[i] = started.group(1)
        if self.live is None:
            self.echo(f"[w{i}] {text}")
            return
        if text.startswith("epoch "):
            self.rows[i] = f"[w{i}] {self.trial[i]} {text}"
            self.live.update(self._render())
        else:
            self.live.console.print(f"[w{i}] {text}", soft_wrap=True, markup=False, highlight=False)

    def say(self, text: str) -> None:
        if self.live is None:
            self.echo(text)
        else:
            self.live.console.print(text, soft_wrap=True, markup=False, highlight=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def run_workers(spec: StudySpec, workers: int, storage: str | None = None, tracking_uri: str | None = None,
                n_trials: int | None = None, report: bool = True, quiet: bool = False,
                echo: Callable[[str], None] = print, live: bool | None = None) -> WorkersOutcome:
    """Prepare the study, run `workers` worker processes on it until it is done (or each ran `n_trials`
    trials), and return what they left. Unless `quiet`, the workers' epoch lines are relayed too (`live`,
    by default when stdout is a terminal: as one live row per worker)."""
    url = storage_url(storage)
    check_storage(url, workers)
    prepared = run(spec, storage=url, tracking_uri=tracking_uri, n_trials=0, quiet=True, echo=echo,
                   report=report, announce=False)
    study = prepared.study
    todo = prepared.progress.remaining
    if todo == 0:
        return WorkersOutcome(prepared, prepared.progress, report=prepared.report)
    n = min(workers, todo)
    what = "grid point(s)" if spec.kind == "grid" else "trial(s) of the budget"
    join = ("SQLite: processes of this machine only" if url.startswith("sqlite:") else
            f"other machines join with `sweeper worker {spec.name} --storage URL`, this storage's URL from there")
    echo(f"starting {n} worker(s) for {todo} {what} on {public_url(url)} ({join})")
    # The storage and tracking URIs go by environment, not by argument: `ps` shows arguments (passwords).
    uris = {"SWEEPER_STORAGE": url, "MLFLOW_TRACKING_URI": prepared.tracking_uri}
    # --relayed: the workers print their trials' lines only; the study's summary, its exit message and the
    # command that resumes it are this process's (one story, not one per worker).
    command = [sys.executable, "-m", "sweeper.cli", "worker", spec.name, "--relayed"] + (["--quiet"] if quiet else []) + (
        ["--n-trials", str(n_trials)] if n_trials else []) + ([] if report else ["--no-report"])
    gpus = _gpu_count()
    procs: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    lock = threading.RLock()  # (RLock: a second Ctrl-C may interrupt the first one's message)
    signals = {"count": 0}

    board = Board(n, echo, sys.stdout.isatty() and not quiet if live is None else live)

    def relay(i: int, proc: subprocess.Popen) -> None:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            with lock:
                board.line(i, line)

    interrupted: set[int] = set()  # workers sent SIGINT (once each: a second would cut their clean stop short)

    def send(p: subprocess.Popen, sig: int) -> None:
        if sig == signal.SIGINT:
            if p.pid in interrupted:
                return
            interrupted.add(p.pid)
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass

    def forward(signum, frame) -> None:
        signals["count"] += 1
        first = signals["count"] == 1
        with lock:
            board.say("interrupting the workers (their running trials are queued again; Ctrl-C again to kill them)"
                      if first else "killing the workers")
        for p in procs:
            send(p, signal.SIGINT if first else signal.SIGKILL)

    setup = _child_setup(_libc())
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(n):  # all started before the threads that relay their lines (fork with no threads)
            if signals["count"]:
                break  # interrupted while starting them: start no more
            proc = subprocess.Popen(command, env={**worker_env(i, n, gpus), **uris}, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=setup)
            procs.append(proc)
            if signals["count"]:  # the signal came while it started: it gets it now
                send(proc, signal.SIGINT)
        for i, proc in enumerate(procs, 1):
            relays.append(threading.Thread(target=relay, args=(i, proc), daemon=True))
            relays[-1].start()
        codes = [p.wait() for p in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for t in relays:
        t.join(10)
    board.close()
    prog = progress(study, spec)
    if signals["count"] and not prog.complete and not prog.running and prepared.parent_run_id:
        _end_parent(prepared, "KILLED", echo)
    path = report_dir(spec.name) / "report.md"
    built = prog.complete and report and study.user_attrs.get(A_REPORT) == f"{prog.done}/{prog.total}" and path.exists()
    return WorkersOutcome(prepared, prog, codes, interrupted=signals["count"] > 0, report=path if built else None)


def _end_parent(prepared: Outcome, status: str, echo: Callable[[str], None]) -> None:
    """End the parent run after the workers stopped. Each interrupted worker ends it KILLED only when no
    trial runs any more; workers interrupted together each see the others' trials still running."""
    from . import tracking

    try:
        client = tracking.connect(prepared.tracking_uri)
    except tracking.TrackingError as err:
        echo(f"the parent run stays RUNNING: {err}")
        return
    tracking.RunLogger(client, prepared.parent_run_id, state_dir() / "spool").close(status, timeout=30)
