"""URLs and their secrets (sweeper/uris.py): passwords masked wherever a URL is shown or written, never
in a process's arguments (the courier's, `sweeper server`'s), spool files private, and an unusable
storage URL or tracking URI one clear `error:` line before anything is created or trained."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT, free_port, write_spec

from sweeper import tracking, uris
from sweeper.cli import main

SECRET = "S3cretPW"


@pytest.mark.parametrize("url, shown", [
    (f"postgresql+psycopg2://sweeper:{SECRET}@postgres:5432/optuna",
     "postgresql+psycopg2://sweeper:***@postgres:5432/optuna"),
    (f"postgresql://u:{SECRET}@127.0.0.1/db", "postgresql://u:***@127.0.0.1/db"),
    (f"mysql+pymysql://u:{SECRET}@h:3306/db?charset=utf8", "mysql+pymysql://u:***@h:3306/db?charset=utf8"),
    (f"http://alice:{SECRET}@mlflow:5000", "http://alice:***@mlflow:5000"),
    (f"https://alice:{SECRET}@mlflow.example.org/prefix", "https://alice:***@mlflow.example.org/prefix"),
    (f"postgresql://u:p@{SECRET}@h/db", "postgresql://u:***@h/db"),  # an unencoded '@' in the password
    (f"postgresql://u:a/{SECRET}@h/db", "postgresql://u:***@h/db"),  # an unencoded '/' (SQLAlchemy reads it)
    (f"postgresql://h/db?user=u&password={SECRET}", "postgresql://h/db?user=u&password=***"),
    (f"https://h/api?x=1&token={SECRET}#top", "https://h/api?x=1&token=***#top"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),  # nothing to mask
    ("http://127.0.0.1:5000/a@b", "http://127.0.0.1:5000/a@b"),  # a port and a path, no password
    ("sqlite:///mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"),
    ("notaurl", "notaurl"),
])
def test_public_masks_the_password(url, shown):
    assert uris.public(url) == shown
    assert SECRET not in uris.public(url)


def test_redact_masks_a_url_and_its_password_inside_text():
    url = f"http://u:{SECRET}@127.0.0.1:1"
    text = f"API request to {url}/api/2.0/mlflow/runs/get failed; password {SECRET} rejected"
    out = uris.redact(text, url)
    assert SECRET not in out and "http://u:***@127.0.0.1:1/api/2.0" in out
    assert uris.masked(uris.public(url)) and not uris.masked(url)


@pytest.mark.parametrize("uri, says", [
    ("ftp://x", "unknown scheme 'ftp'"),
    ("notascheme", "MLflow 3 refuses; use a SQLite file such as sqlite:///notascheme/mlflow.db"),
    ("file:///tmp/store", "sqlite:////tmp/store/mlflow.db"),
    ("localhost:5000", "no scheme (a server is http://localhost:5000)"),
    ("http://", "no host"),
    ("sqlite://", "a SQLite tracking store is a file"),
    ("sqlite:////etc/passwd/m.db", "cannot create the directory /etc/passwd: /etc/passwd is a file"),
])
def test_unusable_tracking_uris_are_a_tracking_error(uri, says):
    with pytest.raises(tracking.TrackingError) as err:
        tracking.tracking_uri(uri)  # (tracking.tracking_uri is uris.tracking_uri)
    assert says in str(err.value) and str(err.value).startswith(f"MLflow tracking URI {uri}")


def test_usable_tracking_uris_pass_and_sqlite_directories_are_made(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/a/b/mlflow.db"
    assert uris.tracking_uri(uri) == uri and (tmp_path / "a" / "b").is_dir()
    for ok in ("http://127.0.0.1:5000", f"postgresql://u:{SECRET}@h/mlflow", "databricks"):
        assert uris.tracking_uri(ok) == ok
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "ftp://x")
    with pytest.raises(uris.TrackingError, match=r"ftp://x \(from \$MLFLOW_TRACKING_URI\)"):
        uris.tracking_uri()
    with pytest.raises(uris.TrackingError, match="password is not stored"):  # a study's stored (masked) URI
        uris.tracking_uri(uris.public(f"postgresql://u:{SECRET}@h/mlflow"))


@pytest.mark.parametrize("url, says", [
    ("sqlite:////etc/passwd/x.db", "cannot create the directory /etc/passwd: /etc/passwd is a file"),
    ("ftp://x", "SQLAlchemy has no database kind 'ftp'"),
    ("notascheme", "not a database URL"),
    ("postgresql+psycopg2://", "no host or database"),
    (f"postgresql+nosuchdriver://u:{SECRET}@h/db", "SQLAlchemy has no database kind"),
])
def test_unusable_storage_urls_are_a_config_error(url, says):
    from trainers.config import ConfigError

    with pytest.raises(ConfigError) as err:
        uris.storage_url(url)
    assert says in str(err.value) and SECRET not in str(err.value)
    assert str(err.value).startswith(f"Optuna storage {uris.public(url)}")


def test_storage_url_default_and_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(uris, "STATE_DIR", tmp_path / "state")
    monkeypatch.delenv("SWEEPER_STORAGE", raising=False)
    assert uris.storage_url() == f"sqlite:///{tmp_path}/state/optuna.db" and (tmp_path / "state").is_dir()
    monkeypatch.setenv("SWEEPER_STORAGE", f"sqlite:///{tmp_path}/env/optuna.db")
    assert uris.storage_url() == f"sqlite:///{tmp_path}/env/optuna.db"
    assert uris.storage_url("sqlite://") == "sqlite://"  # in memory: nothing to create


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux's /proc")
def test_courier_keeps_the_password_out_of_argv_logs_and_spool(tmp_path, capfd):
    """A study's courier on a tracking server that is down (a free port) and whose URI holds a password:
    the password is in no process argument, no line the courier prints, no spool file; the spool files
    are the owner's alone."""
    uri = f"http://u:{SECRET}@127.0.0.1:{free_port()}"
    spool = tmp_path / "spool"
    courier = tracking.Courier(uri, spool)
    try:
        time.sleep(0.2)
        assert courier.proc.poll() is None
        cmd = _cmdline(courier.proc.pid)
        assert "sweeper.tracking" in cmd and SECRET not in cmd and "127.0.0.1" not in cmd
        logger = tracking.logger_for(courier, create={"experiment": "e", "run_name": "r", "parent_run_id": None,
                                                      "key": "e/r/0", "tags": {}})
        logger.log_metrics({"loss": 1.0}, step=1)
        logger.end("FINISHED")
    finally:
        spooled = courier.shutdown(2.0)
    assert spooled == 1
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    (path,) = spool.glob("*.jsonl")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert SECRET not in text and json.loads(text.splitlines()[0])["tracking_uri"] == uris.public(uri)
    out, err = capfd.readouterr()
    assert SECRET not in out + err + (courier.error or "")
    assert "MLflow delivery" in err  # the courier did report the outage (masked)


def test_spool_replays_into_the_same_store_whatever_the_password(tmp_path):
    """Spool files hold the masked URI: they are replayed into the store whose masked URI matches."""
    class Client:
        tracking_uri = f"http://u:{SECRET}@127.0.0.1:1"

    (tmp_path / "x.jsonl").write_text(json.dumps({"tracking_uri": "http://u:***@127.0.0.1:2", "run_id": "r"}) + "\n")
    assert tracking.replay_spool(Client(), tmp_path) == 0  # another store's file stays
    assert (tmp_path / "x.jsonl").exists()


def _sweeper(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("SWEEPER_STORAGE", None)
    return subprocess.run([sys.executable, "-m", "sweeper.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text
    return errors[0]


TRAIN = ["--set", "data.dataset=synthetic", "--set", "data.augment=false", "--set", "model.name=lenet5-classic",
         "--set", "data.synthetic={train_size: 64, test_size: 32, channels: 1, image_size: 16, classes: 4}",
         "--set", "epochs=1", "--set", "batch_size=32"]


@pytest.mark.slow
def test_train_with_an_unusable_tracking_uri_is_one_error_line(tmp_path):
    out = _sweeper("train", "--tracking-uri", "ftp://x", *TRAIN, cwd=tmp_path)
    assert "unknown scheme 'ftp'" in _one_error_line(out)
    assert "epoch" not in out.stdout + out.stderr  # nothing trained


@pytest.mark.parametrize("uri, says", [
    ("notascheme", "MLflow 3 refuses"),
    ("sqlite:////etc/passwd/m.db", "/etc/passwd is a file"),
    ("localhost:5000", "a server is http://localhost:5000"),
])
def test_train_with_an_unusable_tracking_uri_in_process(tmp_path, monkeypatch, uri, says):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--tracking-uri", uri, *TRAIN])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and says in result.output and "epoch" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_train_echoes_the_tracking_uri_masked(monkeypatch, tmp_path):
    """The lines `sweeper train` prints (text and --json) name the store without its password."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sweeper.run.run_training", lambda *a, **k: (_Result(), "rid", k["tracking_uri"]))
    secret_uri = f"postgresql+psycopg2://u:{SECRET}@127.0.0.1:1/mlflow"
    for extra in ([], ["--json"]):
        result = CliRunner().invoke(main, ["train", "--tracking-uri", secret_uri, *extra])
        assert result.exit_code == 0, result.output
        assert SECRET not in result.output and uris.public(secret_uri) in result.output


class _Result:
    def summary(self):
        return {"status": "completed", "epochs_completed": 1, "total_time": 1.0, "device": "cpu"}

    def to_dict(self):
        return {"summary": self.summary()}


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite:////etc/passwd/x.db", f"postgresql+nosuchdriver://u:{SECRET}@h/db"])
def test_study_list_with_an_unusable_storage_is_one_error_line(tmp_path, storage):
    line = _one_error_line(_sweeper("study", "list", "--storage", storage, cwd=tmp_path))
    assert line.startswith(f"error: Optuna storage {uris.public(storage)}") and SECRET not in line


@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["--tracking-uri", "ftp://x"], "unknown scheme 'ftp'"),
    (["--tracking-uri", "notascheme"], "MLflow 3 refuses"),
    (["--tracking-uri", "sqlite:////etc/passwd/m.db"], "/etc/passwd is a file"),
    (["--storage", "sqlite:////etc/passwd/x.db"], "/etc/passwd is a file"),
])
def test_study_run_with_an_unusable_uri_fails_before_anything_runs(tmp_path, args, says):
    spec = write_spec(tmp_path / "s.yaml", "bad-uri")
    out = _sweeper("study", "run", str(spec), *args, cwd=tmp_path)
    assert says in _one_error_line(out)
    assert "trial" not in out.stdout.lower() and not (tmp_path / "mlruns" / "checkpoints").exists()


def test_server_passes_the_store_by_environment(tmp_path, monkeypatch):
    """`sweeper server` execs `mlflow server` with the backend store in MLFLOW_BACKEND_STORE_URI, not in
    its arguments, and prints it masked; a store it cannot use is one error line."""
    import sweeper.cli as cli

    seen = {}
    monkeypatch.setattr(cli.os, "execve", lambda path, args, env: seen.update(args=args, env=env))
    uri = f"postgresql+psycopg2://u:{SECRET}@127.0.0.1:1/mlflow"
    result = CliRunner().invoke(main, ["server", "--backend-store-uri", uri])
    assert result.exit_code == 0, result.output
    assert SECRET not in " ".join(seen["args"]) and seen["env"]["MLFLOW_BACKEND_STORE_URI"] == uri
    assert SECRET not in result.output and uris.public(uri) in result.output
    for bad in ("ftp://x", "http://127.0.0.1:5000", "sqlite:////etc/passwd/m.db"):
        result = CliRunner().invoke(main, ["server", "--backend-store-uri", bad])
        assert result.exit_code == 2 and result.output.startswith("error: "), result.output
