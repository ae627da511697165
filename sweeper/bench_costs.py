"""`sweeper bench --fixed-costs`: the study layer's fixed costs, each beside the bare Optuna/MLflow calls
that do the same job.

Every row is the median over `repeats` interleaved repeats (arm order a-b, b-a, a-b, ...: drift of the
machine's load hits both arms alike). Unless a row says otherwise, both arms are processes timed from
launch to exit, so Python's start and the imports count in both. Every arm runs with one OpenMP/MKL
thread (`threads`) and its own state directory under a temporary one; no arm reads the caller's
$MLFLOW_TRACKING_URI or $SWEEPER_STORAGE.

1. status: `sweeper study status NAME` on a complete tiny study (SQLite Optuna storage, SQLite MLflow
   store; run with `--no-report` unless `report`: its report is no part of these rows) | bare:
   `python -c` that imports optuna and loads the study's trials (`optuna.load_study`, `get_trials`).
2. list: `sweeper study list` on the same storage (that one study) | bare: `python -c` that imports
   optuna and calls `optuna.get_all_study_summaries` (best trial included) on it.
3. rerun: `sweeper study run SPEC` again on that complete study, with `--no-report` as it ran (it
   prints "is complete; nothing to run", which is checked; a study whose report was built reruns alike)
   | bare: `python -c` that loads the study with optuna and checks that every trial is COMPLETE.
4. delivery: a real `mlflow server --backend-store-uri sqlite:///... --host 127.0.0.1 --port P` is
   started once (a free loopback port; ready when /health answers; stopped at the end, also on error).
   Each repeat runs a fresh tiny study against it (`sweeper study run SPEC --tracking-uri
   http://127.0.0.1:P --quiet`, without its report unless `report`), and the row's figure is the "final
   delivery X s" of the study's last line: the seconds from its last trial's end to everything handed
   to MLflow, measured inside the process and printed to 0.1 s. Bare: `python -c` that creates a fresh
   run on the same server, then times (inside the process, like the study's figure) one `log_batch` of
   the metrics a trial logs for one epoch (the same keys, read from the complete study of rows 1-3)
   and `set_terminated`: what a final delivery must at least do. Both arms' launch-to-exit walls are
   kept in the result too.
5. workers: `sweeper study run SPEC --workers 2 --quiet` against `sweeper study run SPEC --quiet` on a
   grid of `worker_points` small synthetic trials (about 1-2 s of training each on one thread; the
   1-worker runs' training time per trial is printed), a fresh study every run (without its report
   unless `report`), launch to exit. The figure is median wall(2 workers) / median wall(1 worker).

The targets are the ones the issue set; whether they are met comes only from running this (there is
no figure in this file). Times are medians; `samples` in the result keeps every repeat.

This module's top level imports nothing heavy: the arms measure their own imports.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Callable


@dataclass
class CostBenchSettings:
    repeats: int = 3  # interleaved (sweeper, bare) pairs per row; medians are reported
    epochs: int = 2  # per trial, in every study of the benchmark
    train_size: int = 320  # training images of the tiny trials (rows 1-4)
    points: int = 2  # grid points of the tiny studies (rows 1-4)
    worker_points: int = 8  # grid points of row 5
    worker_train_size: int = 16000  # training images of row 5's trials: about 1-2 s of training each
    threads: int = 1  # OMP/MKL threads of every arm
    server_workers: int = 1  # `mlflow server --workers` (one client at a time talks to it)
    report: bool = False  # let the studies build their reports (off: `--no-report`; not a fixed cost here)
    workdir: str | None = None  # keep everything here instead of a temporary directory


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    target: float  # the figure must be at most this
    ratio: bool = False  # the figure is median(sweeper) / median(bare), not median(sweeper) in seconds


ROWS = (Row("status", "study status NAME (complete study)", 0.5),
        Row("list", "study list", 0.5),
        Row("rerun", "study run SPEC (complete: nothing to run)", 1.0),
        Row("delivery", "final delivery to a live MLflow server", 0.5),
        Row("workers", "study run --workers 2 (sweeper) vs 1 (bare)", 0.65, ratio=True))

DELIVERY = re.compile(r"final delivery (\d+(?:\.\d+)?) s")
TRAINING = re.compile(r"time: [\d.]+ s, ([\d.]+) s of it training")
NOTHING_TO_RUN = "is complete; nothing to run"


# --------------------------------------------------------------------------------------------------
# Specs and processes


def base_config(s: CostBenchSettings, train_size: int) -> dict:
    return {"data": {"dataset": "synthetic", "augment": False,
                     "synthetic": {"train_size": train_size, "test_size": 64, "channels": 1, "image_size": 16,
                                   "classes": 4}},
            "model": {"name": "lenet5-classic"}, "optim": {"name": "sgdm", "lr": 0.05},
            "epochs": s.epochs, "batch_size": 32, "device": "cpu"}


def write_spec(path: Path, name: str, base: dict, points: int) -> Path:
    import yaml

    spec = {"name": name, "kind": "grid", "description": "sweeper bench --fixed-costs", "base": base,
            "grid": {"optim.lr": [round(0.05 * 1.25 ** i, 6) for i in range(points)]}, "seeds": [0]}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def sweeper_cmd(*args: str) -> list[str]:
    """The `sweeper` console script beside this interpreter (what a user types), else `python -m sweeper.cli`."""
    script = shutil.which("sweeper", path=str(Path(sys.executable).parent))
    return [script, *args] if script else [sys.executable, "-m", "sweeper.cli", *args]


def python_cmd(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def arm_env(s: CostBenchSettings, state_dir: Path) -> dict[str, str]:
    from .bench_study import arm_env as process_env

    return process_env(s.threads, state_dir)


def timed(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """(seconds from launch to exit, stdout + stderr) of a process run to its end; a failure raises with
    the tail of its output."""
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} ... exited with {proc.returncode}:\n{proc.stdout[-3000:]}")
    return wall, proc.stdout


def last_match(pattern: re.Pattern, output: str, what: str) -> float:
    found = pattern.findall(output)
    if not found:
        raise RuntimeError(f"{what}: no '{pattern.pattern}' in its output:\n{output[-3000:]}")
    return float(found[-1])


# --------------------------------------------------------------------------------------------------
# A real MLflow server, as `mlflow server` starts it


class MlflowServer:
    """`python -m mlflow server` over a SQLite store on a free loopback port, in a session of its own
    (its uvicorn workers are stopped with it)."""

    def __init__(self, root: Path, workers: int):
        self.root, self.workers = root, workers
        with socket.socket() as sock:  # a port the kernel says is free now
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def launch(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)],
                cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server at {self.uri} did not start:\n"
                                   f"{(self.root / 'server.log').read_text(errors='replace')[-3000:]}")
            time.sleep(0.25)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the session it leads: the server and its workers
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


# --------------------------------------------------------------------------------------------------
# The arms. Each returns the row's figure of one run (seconds); `extras` collects what is kept beside it.


LOAD_TRIALS = """\
import sys, optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name=sys.argv[1], storage=sys.argv[2])
print(len(study.get_trials(deepcopy=False)), "trials")
"""

SUMMARIES = """\
import sys, optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
print(len(optuna.get_all_study_summaries(sys.argv[1], include_best_trial=True)), "studies")
"""

ALL_COMPLETE = """\
import sys, optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name=sys.argv[1], storage=sys.argv[2])
trials = study.get_trials(deepcopy=False)
if not trials or any(t.state != optuna.trial.TrialState.COMPLETE for t in trials):
    sys.exit("not complete")
print(len(trials), "trials complete")
"""

LOG_EPOCH_AND_END = """\
import sys, time
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
uri, name, step, keys = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
client = MlflowClient(tracking_uri=uri)
exp = client.get_experiment_by_name(name)
run_id = client.create_run(exp.experiment_id if exp else client.create_experiment(name)).info.run_id
started = time.perf_counter()
stamp = int(time.time() * 1000)
client.log_batch(run_id, metrics=[Metric(key, 0.5, stamp, step) for key in keys])
client.set_terminated(run_id)
print(f"delivered {time.perf_counter() - started:.6f} s")
"""


@dataclass
class Setup:
    """What the rows share: the complete study of rows 1-3, the server of row 4, the directories."""

    work: Path
    name: str  # the complete study
    spec: Path
    state: Path  # its state directory: optuna.db, mlflow.db
    epoch_keys: list[str]  # the metrics a trial of it logged at its last epoch
    server: MlflowServer

    @property
    def storage(self) -> str:
        return f"sqlite:///{self.state / 'optuna.db'}"


def report_flag(s: CostBenchSettings) -> list[str]:
    return [] if s.report else ["--no-report"]


def complete_study(s: CostBenchSettings, work: Path) -> tuple[str, Path, Path]:
    """A tiny study run to completion: (name, spec, state dir)."""
    name, state = unique("bench-costs-done"), work / "complete"
    spec = write_spec(work / f"{name}.yaml", name, base_config(s, s.train_size), s.points)
    timed(sweeper_cmd("study", "run", str(spec), "--quiet", *report_flag(s)), arm_env(s, state), work)
    return name, spec, state


def epoch_keys(state: Path, name: str, epoch: int) -> list[str]:
    """The metric keys one trial of study NAME logged at `epoch` (its MLflow store in `state`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    run = next(r for r in client.search_runs([exp.experiment_id]) if "optuna.origin_trial" in r.data.tags)
    return sorted(key for key in run.data.metrics
                  if any(m.step == epoch for m in client.get_metric_history(run.info.run_id, key)))


def status_arm(s: CostBenchSettings, st: Setup, arm: str, extras: dict) -> float:
    args = (sweeper_cmd("study", "status", st.name) if arm == "sweeper" else
            python_cmd(LOAD_TRIALS, st.name, st.storage))
    return timed(args, arm_env(s, st.state), st.work)[0]


def list_arm(s: CostBenchSettings, st: Setup, arm: str, extras: dict) -> float:
    args = sweeper_cmd("study", "list") if arm == "sweeper" else python_cmd(SUMMARIES, st.storage)
    return timed(args, arm_env(s, st.state), st.work)[0]


def rerun_arm(s: CostBenchSettings, st: Setup, arm: str, extras: dict) -> float:
    if arm == "bare":
        return timed(python_cmd(ALL_COMPLETE, st.name, st.storage), arm_env(s, st.state), st.work)[0]
    wall, out = timed(sweeper_cmd("study", "run", str(st.spec), *report_flag(s)), arm_env(s, st.state), st.work)
    if NOTHING_TO_RUN not in out:  # the rerun must find the study complete, or it measures something else
        raise RuntimeError(f"the rerun of complete study {st.name} ran something:\n{out[-3000:]}")
    return wall


def delivery_arm(s: CostBenchSettings, st: Setup, arm: str, extras: dict) -> float:
    env = arm_env(s, st.work / "delivery")
    if arm == "bare":
        args = python_cmd(LOG_EPOCH_AND_END, st.server.uri, "bench-costs-bare-delivery", str(s.epochs),
                          ",".join(st.epoch_keys))
        wall, out = timed(args, env, st.work)
        figure = last_match(re.compile(r"delivered ([\d.]+) s"), out, "the bare delivery")
    else:
        name = unique("bench-costs-delivery")
        spec = write_spec(st.work / f"{name}.yaml", name, base_config(s, s.train_size), s.points)
        args = sweeper_cmd("study", "run", str(spec), "--tracking-uri", st.server.uri, "--quiet",
                           *report_flag(s))
        wall, out = timed(args, env, st.work)
        figure = last_match(DELIVERY, out, f"study {name}")
    extras.setdefault("delivery_walls", {"sweeper": [], "bare": []})[arm].append(wall)
    return figure


def workers_arm(s: CostBenchSettings, st: Setup, arm: str, extras: dict) -> float:
    """arm "sweeper": 2 workers; "bare": 1 worker (the ratio of the two is the row's figure)."""
    name = unique(f"bench-costs-workers{2 if arm == 'sweeper' else 1}")
    spec = write_spec(st.work / f"{name}.yaml", name, base_config(s, s.worker_train_size), s.worker_points)
    args = sweeper_cmd("study", "run", str(spec), "--quiet", *report_flag(s),
                       *(["--workers", "2"] if arm == "sweeper" else []))
    wall, out = timed(args, arm_env(s, st.work / "workers"), st.work)
    if arm == "bare":  # the 1-worker run prints its training time; 2 workers print no time line
        training = last_match(TRAINING, out, f"study {name}")
        extras.setdefault("training_per_trial", []).append(training / s.worker_points)
    return wall


ARMS: dict[str, Callable[[CostBenchSettings, Setup, str, dict], float]] = {
    "status": status_arm, "list": list_arm, "rerun": rerun_arm, "delivery": delivery_arm, "workers": workers_arm}


# --------------------------------------------------------------------------------------------------


def run_cost_bench(s: CostBenchSettings, log: Callable[[str], None] = print) -> dict:
    if s.repeats < 1 or s.epochs < 1 or s.points < 1 or s.worker_points < 1:
        raise ValueError("repeats, epochs, points and worker points must be at least 1")
    work = Path(s.workdir) if s.workdir else Path(tempfile.mkdtemp(prefix="sweeper-bench-costs-"))
    work.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(work / "server", s.server_workers)
    try:
        server.launch()  # it boots while the complete study runs
        log(f"preparing: a complete {s.points}-point study, an MLflow server at {server.uri}")
        name, spec, state = complete_study(s, work)
        server.wait_ready()
        st = Setup(work, name, spec, state, epoch_keys(state, name, s.epochs), server)
        samples = {row.key: {"sweeper": [], "bare": []} for row in ROWS}
        extras: dict = {}
        for rep in range(s.repeats):
            order = ("sweeper", "bare") if rep % 2 == 0 else ("bare", "sweeper")  # a-b, b-a, a-b, ...
            for row in ROWS:
                for arm in order:
                    samples[row.key][arm].append(ARMS[row.key](s, st, arm, extras))
                log(f"[{rep + 1}/{s.repeats}] {row.key:<9} sweeper {samples[row.key]['sweeper'][-1]:7.3f} s, "
                    f"bare {samples[row.key]['bare'][-1]:7.3f} s")
    finally:
        server.stop()  # also on error: nothing of the benchmark outlives it
        if not s.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return {**summarize(s, samples, log, extras), "mlflow_server": server.uri}


def row_result(row: Row, arms: dict[str, list[float]]) -> dict:
    sweeper, bare = median(arms["sweeper"]), median(arms["bare"])
    figure = sweeper / bare if row.ratio else sweeper
    return {"label": row.label, "sweeper": sweeper, "bare": bare, "figure": figure, "target": row.target,
            "met": figure <= row.target, "repeats": len(arms["sweeper"])}


def table(rows: dict[str, dict]) -> list[str]:
    """The printed table: one line per row; a ratio row's figure has no unit."""
    lines = [f"{'row':<46}{'sweeper':>9}{'bare':>9}{'figure':>9}{'target':>11}{'met':>5}{'repeats':>9}"]
    for row in ROWS:
        r = rows[row.key]
        unit = "" if row.ratio else " s"
        lines.append(f"{row.label:<46}{r['sweeper']:>7.3f} s{r['bare']:>7.3f} s{r['figure']:>7.3f}{unit or '  '}"
                     f"{'<= ' + format(r['target'], 'g') + unit:>11}{'yes' if r['met'] else 'no':>5}"
                     f"{r['repeats']:>9}")
    return lines


def summarize(s: CostBenchSettings, samples: dict[str, dict[str, list[float]]], log: Callable[[str], None],
              extras: dict | None = None) -> dict:
    extras = extras or {}
    rows = {row.key: row_result(row, samples[row.key]) for row in ROWS}
    log(f"\nfixed costs of the study layer beside the bare Optuna/MLflow calls; medians of {s.repeats} "
        f"interleaved repeats, {s.threads} thread(s); targets of the issue")
    for line in table(rows):
        log(line)
    walls = extras.get("delivery_walls")
    if walls:
        log(f"delivery, launch to exit: the study {median(walls['sweeper']):.2f} s, the bare calls "
            f"{median(walls['bare']):.2f} s (the row compares the seconds each spends delivering)")
    if extras.get("training_per_trial"):
        log(f"workers: {s.worker_points} trials of {median(extras['training_per_trial']):.2f} s of training each "
            f"(1-worker runs)")
    return {"settings": asdict(s), "rows": rows, "all_met": all(r["met"] for r in rows.values()),
            "samples": samples, "extras": extras}
