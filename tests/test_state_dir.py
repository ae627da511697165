"""Where local state lives (sweeper/uris.py): $SWEEPER_STATE_DIR, else the nearest mlruns/ in the working
directory or above it, else ./mlruns. Commands that read a study never create a store, and a study's
report has one place, <state dir>/reports/NAME/. Studies are made with Optuna's ask/tell: nothing trains."""
from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import pytest
from conftest import TINY_BASE, subprocess_env, sweeper_cmd, write_spec

from sweeper import study as st
from sweeper import uris
from sweeper.spec import StudySpec

NO_STATE = "no sweeper state found"


def make_study(state: Path, name: str, finished: bool = False) -> None:
    """A grid study of two points in the SQLite storage of state directory `state`; `finished`: both
    points COMPLETE with a result (what a report reads)."""
    storage = st.open_storage(f"sqlite:///{state}/optuna.db")
    spec = StudySpec.from_dict({"name": name, "kind": "grid", "base": TINY_BASE, "grid": {"optim.lr": [0.01, 0.02]}})
    study = st.open_study(spec, storage)
    for value in ([50.0, 60.0] if finished else []):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = study.ask()
        st.suggest(trial, spec)
        trial.report(value, 1)
        trial.set_user_attr(st.T_RESULT, {"status": "completed", "summary": {"final_eval_acc": value, "epochs": 1},
                                          "curves": {"eval_acc": [value]}})
        study.tell(trial, value)
    storage.engine.dispose()


def sweeper(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`sweeper ARGS` run in `cwd`, with no state directory or storage in its environment but `env`."""
    clean = subprocess_env(cwd)
    for name in ("SWEEPER_STATE_DIR", "SWEEPER_STORAGE"):
        clean.pop(name, None)
    return subprocess.run(sweeper_cmd(*args), capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**clean, **env})


def files_under(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


@pytest.fixture
def bare(tmp_path):
    """A directory with no mlruns/ in it or above it."""
    if uris.find_state_dir(tmp_path) is not None:
        pytest.skip(f"{uris.find_state_dir(tmp_path)} is above the test's directory")
    return tmp_path


# -- the rule -------------------------------------------------------------------------------------------


def test_the_nearest_mlruns_above_is_found_relative_to_where_one_stands(bare, monkeypatch):
    monkeypatch.delenv("SWEEPER_STATE_DIR", raising=False)
    deep = bare / "proj" / "a" / "b"
    deep.mkdir(parents=True)
    assert uris.find_state_dir(deep) is None and uris.locate_state_dir(deep) == Path("mlruns")
    (bare / "proj" / "mlruns").mkdir()
    assert uris.find_state_dir(deep) == bare / "proj" / "mlruns"
    assert uris.locate_state_dir(deep) == Path("../../mlruns")
    assert uris.locate_state_dir(bare / "proj") == Path("mlruns")
    monkeypatch.setenv("SWEEPER_STATE_DIR", str(bare / "elsewhere"))
    assert uris.locate_state_dir(deep) == bare / "elsewhere"  # the variable wins, existing or not


def test_default_urls_name_the_state_directory_by_its_absolute_path(bare, monkeypatch):
    monkeypatch.chdir(bare)
    monkeypatch.setattr(uris, "STATE_DIR", Path("mlruns"))
    assert uris.default_tracking_uri() == f"sqlite:///{bare}/mlruns/mlflow.db"
    assert uris.default_storage_url() == f"sqlite:///{bare}/mlruns/optuna.db"


def test_require_state_names_where_it_looked(bare, monkeypatch):
    monkeypatch.chdir(bare)
    monkeypatch.setattr(uris, "STATE_DIR", Path("mlruns"))
    monkeypatch.delenv("SWEEPER_STATE_DIR", raising=False)
    monkeypatch.delenv("SWEEPER_STORAGE", raising=False)
    with pytest.raises(uris.NoStateError, match=f"no mlruns/ directory in {bare} or any directory above it"):
        uris.require_state()
    uris.require_state("sqlite:///elsewhere.db")  # a storage given: nothing to find
    (bare / "mlruns").mkdir()
    uris.require_state()


# -- the commands ---------------------------------------------------------------------------------------


def test_study_list_from_a_subdirectory_finds_the_projects_studies(bare):
    make_study(bare / "proj" / "mlruns", "found")
    deep = bare / "proj" / "src" / "notebooks"
    deep.mkdir(parents=True)
    out = sweeper(deep, "study", "list")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("found ") and "0/2" in out.stdout
    assert files_under(bare / "proj" / "src") == [deep]  # nothing made where it ran


@pytest.mark.parametrize("args", [["study", "list"], ["study", "status", "q"], ["study", "report", "q"],
                                  ["study", "delete", "q", "--yes"], ["study", "resume", "q"], ["worker", "q"]],
                         ids=lambda a: " ".join(a[:2]))
def test_reading_commands_without_state_stop_and_create_nothing(bare, args):
    out = sweeper(bare, *args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"error: {NO_STATE}: no mlruns/ directory in {bare} or any directory above it")
    assert "SWEEPER_STATE_DIR" in out.stderr and "--storage" in out.stderr
    assert files_under(bare) == []


def test_sweeper_state_dir_wins_over_the_nearest_mlruns(bare):
    make_study(bare / "proj" / "mlruns", "nearest")
    make_study(bare / "other", "chosen")
    out = sweeper(bare / "proj", "study", "list", SWEEPER_STATE_DIR=str(bare / "other"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("chosen ") and "nearest" not in out.stdout
    missing = bare / "missing"
    out = sweeper(bare / "proj", "study", "list", SWEEPER_STATE_DIR=str(missing))
    assert out.returncode == 2 and f"$SWEEPER_STATE_DIR is {missing}, which is not a directory" in out.stderr
    assert not missing.exists()


def test_study_report_writes_under_the_state_dir(bare):
    state = bare / "proj" / "mlruns"
    make_study(state, "rep", finished=True)
    sub = bare / "proj" / "analysis"
    sub.mkdir()
    out = sweeper(sub, "study", "report", "rep", "--no-log")
    assert out.returncode == 0, out.stderr
    assert "../mlruns/reports/rep/report.md" in out.stdout.splitlines()
    assert (state / "reports" / "rep" / "report.md").is_file()
    assert files_under(sub) == []


@pytest.mark.slow
def test_study_run_from_a_subdirectory_creates_the_study_in_the_projects_state(bare, monkeypatch):
    """A creating command uses the state directory it finds; the study keeps its local tracking store
    relative to the state directory's parent, so a command from another directory, or after the project
    moved, reaches the same MLflow store."""
    from sweeper.study.run import resolve_tracking

    state = bare / "proj" / "mlruns"
    state.mkdir(parents=True)
    spec = write_spec(bare / "proj" / "s.yaml", "made")
    sub = bare / "proj" / "sub"
    sub.mkdir()
    out = sweeper(sub, "study", "run", str(spec), "--n-trials", "0")
    assert out.returncode == 0, out.stderr
    assert files_under(sub) == [] and (state / "optuna.db").is_file() and (state / "mlflow.db").is_file()
    moved = bare / "moved"
    (bare / "proj").rename(moved)
    study, _ = st.load("made", st.open_storage(f"sqlite:///{moved}/mlruns/optuna.db"))
    assert study.user_attrs[st.A_TRACKING] == "sqlite:///mlruns/mlflow.db"
    monkeypatch.chdir(moved / "sub")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(uris, "STATE_DIR", uris.locate_state_dir())
    assert resolve_tracking(study, None) == f"sqlite:///{moved}/mlruns/mlflow.db"
