"""A password in the tracking URI never shows: not in a process list while a study runs, not on the
console, not in Optuna's store, not in MLflow's records or artifacts, not in any file under mlruns/."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import subprocess_env, sweeper_cmd, write_spec

PW = "Sw33perSecretPW"

pytestmark = pytest.mark.slow


def command_lines() -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out.append((d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return out


def files_holding(root: Path, secret: str) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            try:
                if secret.encode() in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                pass
    return hits


def test_a_tracking_password_appears_nowhere(workdir, mlflow_server):
    uri = mlflow_server.uri.replace("http://", f"http://sweeper:{PW}@")
    spec = write_spec(workdir / "s.yaml", "secret")
    env = {**subprocess_env(workdir), "MLFLOW_TRACKING_URI": uri}  # (subprocess_env drops that variable)
    proc = subprocess.Popen(sweeper_cmd("study", "run", str(spec)), cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    while proc.poll() is None:  # every process of this machine, while the study (and its courier) run
        seen += [line for line in command_lines() if PW in line]
        time.sleep(0.1)
    out = proc.communicate()[0].decode()
    assert proc.returncode == 0, out
    assert not seen, seen
    assert PW not in out, out
    assert "secret: 2/2 done" in out, out
    status = subprocess.run(sweeper_cmd("study", "status", "secret"), cwd=workdir, env=env, capture_output=True,
                            text=True)
    assert PW not in status.stdout + status.stderr
    # The study keeps the URI masked: a resume must be given the whole URI, and says so.
    bare = subprocess_env(workdir)
    resumed = subprocess.run(sweeper_cmd("study", "resume", "secret"), cwd=workdir, env=bare, capture_output=True,
                             text=True)
    assert resumed.returncode == 2 and "MLFLOW_TRACKING_URI" in resumed.stderr and PW not in resumed.stderr
    resumed = subprocess.run(sweeper_cmd("study", "resume", "secret"), cwd=workdir, env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0 and "is complete" in resumed.stdout and PW not in resumed.stdout + resumed.stderr
    assert not files_holding(workdir, PW)  # Optuna's store, spool, staged artifacts, reports
    assert not files_holding(mlflow_server.root, PW)  # MLflow's records and artifacts
    for path in (workdir / "mlruns").rglob("*"):  # (what a kill leaves to deliver is private too)
        if "spool" in path.parts:
            assert not path.stat().st_mode & 0o077, path
