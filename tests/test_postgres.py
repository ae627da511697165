"""Workers sharing a real PostgreSQL server (started here on a free loopback port, in a temporary data
directory, and stopped at the end): two `sweeper worker` processes complete one grid, each point exactly
once, each trial one MLflow child run under the study's one parent run, and the parent run ends only
when the last trial of the study is done, by the worker that ran it, which also builds the report."""
from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from conftest import TINY_BASE, free_port, pop_race, subprocess_env, sweeper_cmd, write_spec
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweeper import study as st
from sweeper.cli import main

pytestmark = pytest.mark.slow


def _pg_bindir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, else Debian's /usr/lib/postgresql/VERSION/bin (newest)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]) if
                  d.split("/")[-2].isdigit() else 0, reverse=True)
    for d in dirs:
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    return None


class PostgresServer:
    """initdb + pg_ctl in a temporary directory, listening on 127.0.0.1:PORT only (trust auth, no fsync).
    PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user (Debian's
    package creates it), else `nobody`, and owns its directory."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="sweeper-pg-"))  # under /tmp: reachable by that user
        self.data = self.root / "data"
        self.user: dict = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pw = pwd.getpwnam("nobody")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _pg(self, *args: str) -> str:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root, timeout=120, **self.user)
        if out.returncode != 0:
            log = self.root / "server.log"
            raise RuntimeError(f"{' '.join(cmd)} exited with {out.returncode}: {out.stdout}{out.stderr}"
                               + (log.read_text()[-2000:] if log.exists() else ""))
        return out.stdout

    def start(self) -> None:
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c synchronous_commit=off "
                   f"-c full_page_writes=off")
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w",
                 "-t", "60", "start")

    def create_database(self, name: str) -> str:
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        con.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin; "
                    "install Debian's `postgresql` package to run these tests")
    server = PostgresServer(bindir)
    try:
        server.start()
    except BaseException:
        shutil.rmtree(server.root, ignore_errors=True)
        raise
    yield server
    server.stop()


def test_each_queued_point_is_popped_once(postgres):
    """The contract the grid queue rests on: eight threads (eight pooled connections) asking at once
    take each queued point exactly once."""
    storage = st.open_storage(postgres.create_database("pops"))
    assert pop_race(storage, threads=8, points=24) == list(range(24))


def _running_with_an_epoch(con, pid: int) -> list[int]:
    """Numbers of the RUNNING trials of worker `pid` that reported an epoch (one cheap query: polled)."""
    with con.cursor() as cur:
        cur.execute("SELECT t.number, a.value_json FROM trials t JOIN trial_user_attributes a ON a.trial_id = "
                    "t.trial_id AND a.key = %s WHERE t.state = 'RUNNING' AND EXISTS (SELECT 1 FROM "
                    "trial_intermediate_values v WHERE v.trial_id = t.trial_id)", (st.T_WORKER,))
        return [number for number, worker in cur.fetchall() if json.loads(worker)["pid"] == pid]


def test_two_workers_on_postgres_complete_a_grid_once(postgres, workdir, mlflow_server):
    """Worker A is stopped (SIGSTOP) in the middle of a trial; worker B joins, runs every point left and
    waits for A's trial: the study is not complete, so the parent run stays RUNNING and no report exists.
    A continues (SIGCONT) and finishes the last trial; the parent run ends FINISHED with one report."""
    import psycopg2

    url = postgres.create_database("optuna")
    con = psycopg2.connect(host="127.0.0.1", port=postgres.port, user="postgres", dbname="optuna")
    con.autocommit = True
    name = "pg-grid"
    base = {**TINY_BASE, "epochs": 4, "data": {**TINY_BASE["data"], "synthetic": {
        **TINY_BASE["data"]["synthetic"], "train_size": 640}}}
    spec = write_spec(workdir / "pg.yaml", name, base=base, grid={"optim.lr": [0.02, 0.05, 0.1, 0.2]})
    created = CliRunner().invoke(main, ["study", "run", str(spec), "--n-trials", "0", "--storage", url,
                                        "--tracking-uri", mlflow_server.uri])
    assert created.exit_code == 0 and "4 trial(s) to run" in created.output, created.output
    parent_id = optuna.load_study(study_name=name, storage=url).user_attrs[st.A_PARENT]
    # Both workers find the tracking URI in the study; a long grace period keeps B from taking A's trial.
    env = subprocess_env(workdir, SWEEPER_HEARTBEAT_INTERVAL="1", SWEEPER_HEARTBEAT_GRACE="600")
    worker = sweeper_cmd("worker", name, "--storage", url, "--quiet")

    def start():
        return subprocess.Popen(worker, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    a = b = None
    try:
        a = start()
        deadline = time.monotonic() + 120
        while True:  # stop A while it is inside a trial (not between two), after that trial's first epoch
            assert a.poll() is None, a.stdout.read().decode()
            assert time.monotonic() < deadline, "worker A never reported an epoch"
            if _running_with_an_epoch(con, a.pid):
                a.send_signal(signal.SIGSTOP)
                held = _running_with_an_epoch(con, a.pid)
                if held:
                    break
                a.send_signal(signal.SIGCONT)
            time.sleep(0.002)
        (a_trial,) = held
        before = len(optuna.load_study(study_name=name, storage=url).get_trials(states=(TrialState.COMPLETE,)))
        b = start()
        deadline = time.monotonic() + 180
        while len(optuna.load_study(study_name=name, storage=url).get_trials(states=(TrialState.COMPLETE,))) < 3:
            assert b.poll() is None, b.stdout.read().decode()  # B runs every other point...
            assert time.monotonic() < deadline, "worker B never finished the other points"
            time.sleep(0.2)
        time.sleep(2.0)
        assert b.poll() is None  # ...then waits for A's trial: it would retry it if A's heartbeat went stale
        client = MlflowClient(mlflow_server.uri)
        parent = client.get_run(parent_id)
        assert parent.info.status == "RUNNING"  # A's trial is not done
        assert not client.list_artifacts(parent_id, "report")
        assert not (workdir / "mlruns" / "reports" / name).exists()
        a.send_signal(signal.SIGCONT)
        a_out = a.communicate(timeout=180)[0].decode()
        b_out = b.communicate(timeout=180)[0].decode()
        assert a.returncode == 0 and b.returncode == 0, a_out + b_out
        assert f"report: mlruns/reports/{name}/report.md" in a_out + b_out  # built once, by one of them
        assert f"report: mlruns/reports/{name}/report.md" not in a_out or "report:" not in b_out
    finally:  # a failed assertion leaves no worker behind
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
        con.close()

    study = optuna.load_study(study_name=name, storage=url)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs[st.T_POINT] for t in complete) == [0, 1, 2, 3]  # none twice, none missing
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # A finished what it had finished before it was stopped and the trial it held; B every other point.
    by_worker = Counter(t.user_attrs[st.T_WORKER]["pid"] for t in complete)
    assert by_worker == {a.pid: before + 1, b.pid: 3 - before}, f"worker B:\n{b_out}\nworker A:\n{a_out}"
    assert {t.number: t.user_attrs[st.T_WORKER]["pid"] for t in complete}[a_trial] == a.pid

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweeper.kind") == "study"]
    assert [p.info.run_id for p in parents] == [parent_id]  # one parent run
    assert parents[0].info.status == "FINISHED"
    children = [r for r in runs if r is not parents[0]]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent_id for r in children)
    assert sorted(int(r.data.tags["optuna.origin_trial"]) for r in children) == sorted(t.number for t in complete)
    assert all(r.info.status == "FINISHED" for r in children)
    logged = {art.path for art in client.list_artifacts(parent_id, "report")}
    assert {"report/report.md", "report/summary.md"} <= logged
    report = (workdir / "mlruns" / "reports" / name / "report.md").read_text()
    assert "4 finished trials" in report
