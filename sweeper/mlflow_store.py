"""The local MLflow store is created or migrated before anything trains, and never left half-built.

MLflow builds a SQLite store with ~70 alembic migrations whose DDL SQLite commits statement by
statement, so a process killed during the seconds that a first `MlflowClient(uri)` spends on it leaves
a store that no later open survives ("table label_schemas already exists", "duplicate column name ...").
`prepare(uri)` keeps this invariant instead: at every moment, the database file PATH is either absent
or a complete store at the schema head of the installed MLflow.

- A new store is built by MLflow's own SqlAlchemyStore in a temporary file beside PATH, synced and
  renamed onto PATH. A kill leaves only the temporary file, which the next `prepare` removes.
- A store at an older revision that holds data is upgraded the same way: a copy is migrated aside by
  MLflow's upgrade (what `mlflow db upgrade` does) and renamed onto PATH; the original is kept as
  PATH.pre-upgrade-<time>.
- A store not at head that holds no data (one that an older sweeper left half-built) is moved aside to
  PATH.broken-<time> and built afresh.
- All of it runs under an exclusive lock on PATH.lock: the parallel workers of a study prepare at once.

The fast path (a complete store: every study's start) imports no MLflow. It reads alembic_version with
sqlite3 and compares it with the head revision read from the migration scripts that MLflow ships. Other URIs (a tracking server, PostgreSQL, ...) are left alone: whoever runs them migrates them.
"""
from __future__ import annotations

import fcntl
import glob
import importlib.util
import logging
import os
import re
import sqlite3
import sys
import time
from contextlib import closing, contextmanager, suppress
from functools import cache
from pathlib import Path
from urllib.parse import quote

from .tracking import TrackingError, artifact_root

log = logging.getLogger("sweeper.mlflow_store")

DATA_TABLES = ("runs", "registered_models", "logged_models", "trace_info")  # rows here are a user's data
SIDECARS = ("-journal", "-wal", "-shm")  # SQLite's files beside a database


class StoreError(TrackingError):
    """The local MLflow store cannot be made ready without risking its data; the message says why."""


def prepare(uri: str) -> None:
    """Make the MLflow store at `uri` complete at the installed MLflow's schema head (see the module)."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):].split("?")[0])
    if not path.name or path.name == ":memory:":
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        head = _cheap_head()
        if head is not None and _revision(path) == head:
            return
        _repair(uri, path)


def _repair(uri: str, path: Path) -> None:
    """Under the lock, with PATH missing or not at the head read from the scripts: make it complete."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    for stale in glob.glob(glob.escape(str(path)) + ".building-*"):  # from a build that was killed
        os.unlink(stale)
    head = _get_latest_schema_revision()  # MLflow's own answer (it rules if the cheap one differed)
    if path.exists():
        revision = _revision(path)
        if revision == head:
            return
        if _holds_data(path):
            log.warning("upgrading the MLflow store %s from schema %s to %s", path, revision, head)
            _build(uri, path, upgrade=True)
            return
        aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("",) + SIDECARS:
            if os.path.exists(f"{path}{suffix}"):
                os.replace(f"{path}{suffix}", f"{aside}{suffix}")
        log.warning("the MLflow store %s was half-built (schema %s, not %s) and holds no runs: moved it to "
                    "%s and building a new one", path, revision, head, aside)
    for suffix in SIDECARS:  # a journal without its database would be applied to the new one
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    log.info("creating the MLflow store %s", path)
    _build(uri, path, upgrade=False)


@contextmanager
def _quiet(*names: str):
    """Those loggers at WARNING for the block."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _build(uri: str, path: Path, upgrade: bool) -> None:
    """Build a fresh store (or, with `upgrade`, an upgraded copy of PATH) aside, then rename it onto PATH."""
    tmp = path.with_name(f"{path.name}.building-{os.getpid()}")
    tmp_uri = f"sqlite:///{tmp}"
    with _quiet("mlflow.store.db.utils", "alembic"):  # their INFO lines would land amid a study's output
        _build_at(uri, path, tmp, tmp_uri, upgrade)


def _build_at(uri: str, path: Path, tmp: Path, tmp_uri: str, upgrade: bool) -> None:
    from mlflow.store.db.utils import _upgrade_db, _verify_schema, create_sqlalchemy_engine
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    try:
        if upgrade:
            with closing(_connect(path)) as src, closing(sqlite3.connect(tmp)) as dst:
                src.backup(dst)  # a consistent copy, even while someone reads PATH
            engine = create_sqlalchemy_engine(tmp_uri)
            _upgrade_db(engine)
        else:  # what `mlflow server` or MlflowClient do on a new database, default experiment included
            engine = SqlAlchemyStore(tmp_uri, artifact_root(uri)).engine
            SqlAlchemyStore._engine_map.pop(tmp_uri, None)
        try:
            _verify_schema(engine)
        finally:
            engine.dispose()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except Exception as err:
        for suffix in ("",) + SIDECARS:
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        if not upgrade:
            raise StoreError(f"cannot create the MLflow store {path}: {type(err).__name__}: {err}") from err
        raise StoreError(f"the MLflow store {path} holds runs but its schema ({_revision(path)}) is not the "
                         f"installed MLflow's, and upgrading a copy of it failed ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}). Back it up and run `mlflow db "
                         f"upgrade {uri}`, or restore a backup, or move it away to start a new store.") from err
    if upgrade:  # keep the original (a second name for it): MLflow's advice before any migration
        with suppress(FileExistsError):  # made by a prepare killed before its rename, this second
            os.link(path, path.with_name(f"{path.name}.pre-upgrade-{time.strftime('%Y%m%d-%H%M%S')}"))
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


@contextmanager
def _locked(path: Path):
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _connect(path: Path) -> sqlite3.Connection:
    """An existing database only (mode=rw never creates one); its first read rolls back a hot journal."""
    return sqlite3.connect(f"file:{quote(str(path))}?mode=rw", uri=True, timeout=30)


def _revision(path: Path) -> str | None:
    """The alembic revision stamped in the database at `path`; None if there is none (or no database)."""
    try:
        with closing(_connect(path)) as db:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _holds_data(path: Path) -> bool:
    """Whether any table of DATA_TABLES has a row (a table that cannot be read has none)."""
    try:
        with closing(_connect(path)) as db:
            for table in DATA_TABLES:
                try:
                    if db.execute(f'SELECT 1 FROM "{table}" LIMIT 1').fetchone():
                        return True
                except sqlite3.Error:
                    pass
    except sqlite3.Error:
        pass
    return False


_ASSIGN = re.compile(r"^(revision|down_revision)\b[^=\n]*=(.*)$", re.M)
_QUOTED = re.compile(r"[\"']([^\"']+)[\"']")


@cache
def _cheap_head() -> str | None:
    """The head revision of the migration scripts MLflow ships, read as text without importing them
    (alembic's ScriptDirectory imports them, and MLflow with them: seconds). None if it is not one head."""
    spec = importlib.util.find_spec("mlflow")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    versions = Path(spec.submodule_search_locations[0]) / "store" / "db_migrations" / "versions"
    revisions, parents = set(), set()
    for script in versions.glob("*.py"):
        for name, value in _ASSIGN.findall(script.read_text(encoding="utf-8")):
            (revisions if name == "revision" else parents).update(_QUOTED.findall(value))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


if __name__ == "__main__":  # python -m sweeper.mlflow_store URI
    prepare(sys.argv[1])
