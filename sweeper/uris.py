"""URLs and their secrets: the Optuna storage URL and the MLflow tracking URI, resolved, checked, and
masked wherever they are shown.

- `STATE_DIR`: where local state lives (Optuna's and MLflow's SQLite stores, checkpoints, spool,
  reports): $SWEEPER_STATE_DIR when set, else the nearest `mlruns/` found walking up from the working
  directory (as git finds .git), else `./mlruns`, created by the first command that creates a study or
  a run. `require_state(storage)`: the check of the commands that only read a store.
- `storage_url(url)`: the argument, else $SWEEPER_STORAGE, else SQLite under the state directory; a URL
  that Optuna's RDBStorage cannot take is a `StorageError` (a ConfigError: the CLI prints one line).
- `tracking_uri(uri)`: the argument, else $MLFLOW_TRACKING_URI, else SQLite under the state directory;
  a URI MLflow cannot track into is a `TrackingError`.
  Both create the parent directory of a SQLite file, and say why when they cannot (a file in the way,
  permissions), before anything is created or trained. Their defaults name the state directory by its
  absolute path: a study stores its tracking URI, which then means the same file from any directory.
- `public(url)`: the URL as it may be printed, logged, stored in a study or written to a file: the
  password (and secret-looking query parameters) replaced by `***`. `redact(text, *urls)` does the same
  inside any text (an exception's message, say).

A password goes to other processes by environment or pipe, never by argument: `ps` shows arguments to
every user of the machine. Cheap to import (no SQLAlchemy, MLflow or torch at import time): `sweeper study
list` imports it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from trainers.config import ConfigError

STATE_DIR_NAME = "mlruns"
STATE_DIR_VARIABLE = "SWEEPER_STATE_DIR"
MASK = "***"

# What MLflow 3's client tracks into (mlflow.tracking._tracking_service.utils: the HTTP REST store,
# Databricks, and SQLAlchemy stores for mlflow.store.db.db_types.DATABASE_ENGINES); "file" and plain
# paths make a FileStore, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true; "uc" and
# "databricks-uc" are registered only to raise. Plugins add schemes through the entry point group below.
HTTP_SCHEMES = ("http", "https")
DB_ENGINES = ("postgresql", "mysql", "sqlite", "mssql")
TRACKING_PLUGIN_GROUP = "mlflow.tracking_store"
EXAMPLES = "sqlite:///mlruns/mlflow.db (a local file) or http://HOST:5000 (a server: `sweeper server`)"
STORAGE_EXAMPLES = "sqlite:///mlruns/optuna.db or postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|api[_-]?key|credential|signature|^sig$", re.IGNORECASE)


class TrackingError(RuntimeError):
    """The tracking store cannot be reached, refused a request, or its URI is unusable; the message
    names the URI (masked)."""


class StorageError(ConfigError):
    """The Optuna storage URL is unusable; the message names it (masked)."""


class NoStateError(ConfigError):
    """A command that reads a store found no state directory; the message says where it looked."""


# --------------------------------------------------------------------------------------------------
# The state directory


def _working_dir() -> Path | None:
    try:
        return Path(os.getcwd())
    except OSError:  # the working directory was removed
        return None


def find_state_dir(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest `mlruns/` directory in `start` (default: the working directory) or above it, or None."""
    here = Path(os.path.abspath(start)) if start is not None else _working_dir()
    if here is None:
        return None
    for directory in (here, *here.parents):
        if (directory / STATE_DIR_NAME).is_dir():
            return directory / STATE_DIR_NAME
    return None


def locate_state_dir(start: str | os.PathLike | None = None) -> Path:
    """The state directory by the rule: $SWEEPER_STATE_DIR, else the nearest `mlruns/` at or above `start`
    (relative to it: `mlruns`, `../mlruns`), else `mlruns` (not created here)."""
    given = os.environ.get(STATE_DIR_VARIABLE, "").strip()
    if given:
        return Path(given)
    found = find_state_dir(start)
    if found is None:
        return Path(STATE_DIR_NAME)
    return Path(os.path.relpath(found, os.path.abspath(start) if start is not None else os.getcwd()))


# Resolved once, when the process starts (its commands do not change directory); a path relative to
# the working directory of that moment.
STATE_DIR = locate_state_dir()
DEFAULT_TRACKING_URI = f"sqlite:///{STATE_DIR}/mlflow.db"  # as shown in hints; what is used: default_tracking_uri()


def state_path() -> Path:
    """The state directory as an absolute path (what the default URLs name)."""
    return Path(os.path.abspath(STATE_DIR))


def default_tracking_uri() -> str:
    return f"sqlite:///{state_path()}/mlflow.db"


def default_storage_url() -> str:
    return f"sqlite:///{state_path()}/optuna.db"


def require_state(storage: str | None = None) -> None:
    """A NoStateError unless a store to read is named (`storage`, $SWEEPER_STORAGE) or the state directory
    exists: a command that only reads never creates an empty store."""
    if storage or os.environ.get("SWEEPER_STORAGE") or Path(STATE_DIR).is_dir():
        return
    raise NoStateError(f"no sweeper state found: {_where_looked()}, or give the storage with --storage URL or "
                       f"$SWEEPER_STORAGE")


def _where_looked() -> str:
    """Where the state directory was looked for, and how to choose another."""
    given = os.environ.get(STATE_DIR_VARIABLE, "").strip()
    if given:
        return (f"${STATE_DIR_VARIABLE} is {given}, which is not a directory. Set ${STATE_DIR_VARIABLE} to the "
                f"state directory that holds the study, unset it to use the nearest {STATE_DIR_NAME}/")
    here = _working_dir()
    return (f"no {STATE_DIR_NAME}/ directory in {here if here is not None else 'the working directory'} or any "
            f"directory above it. Run this from the project whose {STATE_DIR_NAME}/ holds the study (or a "
            f"directory below it), set ${STATE_DIR_VARIABLE} to that {STATE_DIR_NAME}/ directory")


# --------------------------------------------------------------------------------------------------
# Masking


def _password_span(url: str) -> tuple[int, int] | None:
    """Where the password of `url` is (start, end), or None. Covers both readings of a URL with an
    unencoded '@' or '/' in its password: SQLAlchemy's (the password ends at the first '@') and
    urllib's (the user info ends at the last '@' before the first '/', '?' or '#'), whichever is longer."""
    m = _SCHEME.match(url)
    if not m:
        return None
    start = m.end()
    stops = [i for i in (url.find(c, start) for c in "/?#") if i >= 0]
    netloc_end = min(stops) if stops else len(url)
    colon = url.find(":", start)
    at = url.find("@", start)
    if colon < 0 or at < 0 or colon > at or any(c in url[start:colon] for c in "/?#"):
        return None  # no "user:" before the first '@' (a port, or no user info at all)
    if netloc_end > at:  # urllib's reading; SQLAlchemy's first '@' is within it
        end = url.rfind("@", start, netloc_end)
    elif m.group(1).split("+", 1)[0].lower() in DB_ENGINES:  # SQLAlchemy's alone: a '/' in the password
        end = at
    else:  # e.g. http://host:5000/path@x: a port, no password
        return None
    return (colon + 1, end) if end > colon + 1 else None


def _mask_query(url: str) -> str:
    """Secret-looking query parameters (password=, token=, api_key=...) masked."""
    q = url.find("?")
    if q < 0:
        return url
    head, query = url[:q + 1], url[q + 1:]
    fragment = ""
    if "#" in query:
        query, fragment = query.split("#", 1)
        fragment = "#" + fragment
    parts = []
    for item in query.split("&"):
        key, sep, value = item.partition("=")
        parts.append(f"{key}={MASK}" if sep and value and _SECRET_KEY.search(unquote(key)) else item)
    return head + "&".join(parts) + fragment


def public(url: str | None) -> str:
    """`url` as it may be shown: its password and secret query parameters replaced by ***. Any text
    that is not a URL is returned as it is (there is nothing to mask)."""
    if not url:
        return url or ""
    url = str(url)
    span = _password_span(url)
    if span is not None:
        url = url[:span[0]] + MASK + url[span[1]:]
    return _mask_query(url)


def secrets(url: str | None) -> list[str]:
    """The secret parts of `url` (its password, secret query values), raw and percent-decoded."""
    if not url:
        return []
    found: list[str] = []
    span = _password_span(url)
    if span is not None:
        found.append(url[span[0]:span[1]])
    q = url.find("?")
    if q >= 0:
        for item in url[q + 1:].split("#")[0].split("&"):
            key, sep, value = item.partition("=")
            if sep and value and _SECRET_KEY.search(unquote(key)):
                found.append(value)
    out: list[str] = []
    for s in found:
        for variant in (s, unquote(s)):
            if variant and variant != MASK and variant not in out:
                out.append(variant)
    return sorted(out, key=len, reverse=True)  # a longer secret before a part of it


def redact(text: object, *urls: str | None) -> str:
    """`text` (an exception's message, a log line) with each of `urls` shown masked and any secret of
    theirs that appears elsewhere in it replaced by ***."""
    text = str(text)
    for url in urls:
        if not url:
            continue
        if url in text:
            text = text.replace(url, public(url))
        for secret in secrets(url):
            if len(secret) >= 3 or secret in text.split():  # (a 1-2 character password: only whole words)
                text = text.replace(secret, MASK)
    return text


def masked(url: str | None) -> bool:
    """`url` carries a password that was masked (e.g. read back from a study's stored attribute)."""
    span = _password_span(url or "")
    return span is not None and url[span[0]:span[1]] == MASK


# --------------------------------------------------------------------------------------------------
# SQLite files


def _sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite[+driver]:/// URL (None: in memory, or a SQLite "file:" URI)."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    if not rest.startswith("/"):
        return None  # sqlite:// (memory) or a malformed URL (reported by the checks)
    path = unquote(rest[1:].split("?", 1)[0])
    if not path or path == ":memory:" or path.startswith("file:") or "mode=memory" in url:
        return None
    return Path(path)


def _prepare_sqlite(url: str, what: str, error: type[Exception], source: str = "") -> None:
    """The directory of a SQLite database file exists (created if missing), the file can be created
    there; else `error` naming the URL and the reason."""
    path = _sqlite_path(url)
    if path is None:
        return
    where = f"{what} {public(url)}{source}"
    if path.is_dir():
        raise error(f"{where}: {path} is a directory, not a database file")
    parent = path.parent
    for p in (parent, *parent.parents):  # the nearest existing ancestor must be a directory
        if p.exists():
            if not p.is_dir():
                raise error(f"{where}: cannot create the directory {parent}: {p} is a file, not a directory")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise error(f"{where}: cannot create the directory {parent}: {err.strerror or err}") from None
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{where}: cannot create the database file in {parent}: permission denied")
    if path.exists() and not os.access(path, os.R_OK):
        raise error(f"{where}: cannot read {path}: permission denied")


# --------------------------------------------------------------------------------------------------
# The MLflow tracking URI


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true")


def _plugin_schemes() -> set[str]:
    """Tracking-store schemes that installed MLflow plugins register (read only for an unknown scheme)."""
    try:
        from importlib.metadata import entry_points

        return {ep.name for ep in entry_points(group=TRACKING_PLUGIN_GROUP)}
    except Exception:  # noqa: BLE001 - no metadata: no plugins
        return set()


def check_tracking_uri(uri: str, source: str = "") -> None:
    """A TrackingError unless MLflow 3 can track into `uri` (scheme and shape; nothing is contacted)."""
    where = f"MLflow tracking URI {public(uri)}{source}"
    parts = urlsplit(uri)
    scheme = parts.scheme.lower() if "://" in uri or parts.scheme in ("file", "databricks") else ""
    if uri in ("databricks", "databricks-uc", "uc"):
        scheme = uri
    if scheme in HTTP_SCHEMES:
        if not parts.hostname:
            raise TrackingError(f"{where}: no host; e.g. http://127.0.0.1:5000")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise TrackingError(f"{where}: the port is not a number") from None
        return
    if scheme == "databricks":
        return
    if scheme in ("uc", "databricks-uc"):
        raise TrackingError(f"{where}: Unity Catalog is a model registry, not a tracking store; use {EXAMPLES}")
    engine = scheme.split("+", 1)[0]
    if engine in DB_ENGINES and scheme.count("+") <= 1:
        if engine == "sqlite":
            if not uri.split("://", 1)[1].startswith("/") or _sqlite_path(uri) is None:
                raise TrackingError(f"{where}: a SQLite tracking store is a file: sqlite:///RELATIVE/PATH.db or "
                                    f"sqlite:////ABSOLUTE/PATH.db")
        elif not parts.hostname and not parts.path.strip("/") and not parts.query:
            raise TrackingError(f"{where}: no host or database; e.g. {engine}://USER:PASSWORD@HOST/DB")
        return
    if scheme == "file" or not scheme:
        if scheme == "file" and _env_true("MLFLOW_ALLOW_FILE_STORE"):
            return
        if not scheme and ":" in uri.split("/", 1)[0] and not uri.startswith(("/", ".")):
            host = uri.split("/", 1)[0]
            raise TrackingError(f"{where}: no scheme (a server is http://{host})")
        path = parts.path if scheme == "file" else uri
        hint = f"sqlite:///{path.rstrip('/') or '.'}/mlflow.db" if path else "sqlite:///mlruns/mlflow.db"
        kind = "a file: URI" if scheme == "file" else "a path without a scheme"
        raise TrackingError(f"{where}: {kind} means a directory store, which MLflow 3 refuses; use a SQLite "
                            f"file such as {hint}, or a server, http://HOST:5000")
    if scheme in _plugin_schemes():
        return
    raise TrackingError(f"{where}: unknown scheme {scheme!r}; MLflow tracks into {EXAMPLES}, or a database "
                        f"(postgresql://, mysql://, mssql://), or databricks")


def _given(what: str, value: str | None, variable: str, option: str, default: str,
           error: type[Exception]) -> tuple[str, str]:
    """The argument, else $`variable`, else `default`; and where it came from, for messages. A URL whose
    password was masked (a study's stored one) is an error that says how to give it."""
    source = ""
    if not value:
        value = os.environ.get(variable)
        source = f" (from ${variable})" if value else ""
    value = (value or default).strip()
    if masked(value):
        raise error(f"{what} {value}{source}: its password is not stored; give the whole URL with {option} or "
                    f"${variable}")
    return value, source


def tracking_uri(uri: str | None = None) -> str:
    """The URI to use: the argument, else $MLFLOW_TRACKING_URI, else SQLite under the state directory
    (`default_tracking_uri`). Checked (`check_tracking_uri`); a SQLite file's directory is created.
    A URI whose password was masked (a study's stored one) is an error that says how to give it."""
    uri, source = _given("MLflow tracking URI", uri, "MLFLOW_TRACKING_URI", "--tracking-uri",
                         default_tracking_uri(), TrackingError)
    check_tracking_uri(uri, source)
    if uri.split("://", 1)[0].split("+", 1)[0].lower() == "sqlite":
        _prepare_sqlite(uri, "MLflow tracking URI", TrackingError, source)
    return uri


# --------------------------------------------------------------------------------------------------
# The Optuna storage URL


def check_storage_url(url: str) -> None:
    """A StorageError unless SQLAlchemy parses `url` and has its dialect and driver (what Optuna's
    RDBStorage needs; nothing is contacted). Imports SQLAlchemy (opening the storage does anyway)."""
    where = f"Optuna storage {public(url)}"
    if "://" not in url:
        raise StorageError(f"{where}: not a database URL; e.g. {STORAGE_EXAMPLES}")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as err:
        raise StorageError(f"{where}: not a database URL ({redact(err, url)}); e.g. {STORAGE_EXAMPLES}") from None
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise StorageError(f"{where}: SQLAlchemy has no database kind {parsed.drivername!r}; e.g. "
                           f"{STORAGE_EXAMPLES}") from None
    except Exception as err:  # noqa: BLE001 - a dialect module that fails to load
        raise StorageError(f"{where}: {type(err).__name__}: {redact(err, url)}") from None
    backend = parsed.get_backend_name()
    if backend != "sqlite" and not (parsed.host or parsed.database or parsed.query):
        raise StorageError(f"{where}: no host or database; e.g. {STORAGE_EXAMPLES}")
    load = getattr(dialect, "import_dbapi", None) or getattr(dialect, "dbapi", None)
    try:
        if callable(load):
            load()
    except ImportError as err:
        hint = ""
        if backend == "postgresql":
            import importlib.util

            hint = (" (write postgresql+psycopg2://..., the installed driver)" if parsed.drivername == "postgresql"
                    and importlib.util.find_spec("psycopg2") else " (pip install -e '.[postgres]')")
        raise StorageError(f"{where}: the driver {parsed.drivername!r} needs a module that is not installed "
                           f"({err}){hint}") from None


def storage_url(url: str | None = None) -> str:
    """The argument, else $SWEEPER_STORAGE, else SQLite beside MLflow's store under the state directory
    (`default_storage_url`). Checked (`check_storage_url`); a SQLite file's directory is created."""
    url, source = _given("Optuna storage", url, "SWEEPER_STORAGE", "--storage", default_storage_url(), StorageError)
    try:
        check_storage_url(url)
    except StorageError as err:
        raise StorageError(f"{err}{source}" if source else str(err)) from None
    if url.split("://", 1)[0].split("+", 1)[0].lower() == "sqlite":
        _prepare_sqlite(url, "Optuna storage", StorageError, source)
    return url
