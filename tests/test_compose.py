"""docker-compose.yml as Compose itself reads it (`docker compose config`, or the standalone
`docker-compose config`: both validate the file against the Compose schema and resolve it without a
Docker engine), checked against what the stack needs: one PostgreSQL for Optuna's storage and MLflow's
backend store, an MLflow server that proxies artifacts into a volume and answers the workers' Host
header, workers whose command our CLI accepts; and against what keeps it private: no password in the
file (it comes from the environment, .env.example), ports published on 127.0.0.1 unless SWEEPER_BIND says
otherwise, MLflow's allowed hosts limited to loopback and the private ranges, the image not running as
root. Skipped when no Compose client is installed."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest
import yaml
from conftest import ROOT

PASSWORD = "Test-pw_4compose"
OURS = ("STUDY", "SWEEPER_PUBLIC_HOST", "SWEEPER_BIND", "POSTGRES_USER", "POSTGRES_PASSWORD")


def compose_client() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def resolve(tmp_path, env_file: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """`config` with the file's defaults (none of our variables from this environment, no .env of the
    checkout), plus `env`."""
    client = compose_client()
    if client is None:
        pytest.skip("no Compose client (`docker compose` plugin or `docker-compose`) is installed")
    if env_file is None:
        env_file = str(tmp_path / "empty.env")
        open(env_file, "w").close()
    full = {**{k: v for k, v in os.environ.items() if k not in OURS}, **env}
    return subprocess.run([*client, "-f", str(ROOT / "docker-compose.yml"), "--env-file", env_file, "config"],
                          cwd=ROOT, capture_output=True, text=True, env=full, timeout=120)


def config(tmp_path, **env: str) -> dict:
    out = resolve(tmp_path, **{"POSTGRES_PASSWORD": PASSWORD, **env})
    assert out.returncode == 0, f"compose config rejected docker-compose.yml:\n{out.stderr}"
    return yaml.safe_load(out.stdout)


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> dict:
    return config(tmp_path_factory.mktemp("compose"))


def words(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def volumes(service: dict) -> dict[str, str]:
    """target -> source, from either client's output (strings in v1, mappings in v2)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v.get("source"), v["target"]
        out[target] = source
    return out


def ports(service: dict) -> dict[int, str]:
    """container port -> the host address it is published on (v1: "IP:HOST:CONTAINER/tcp"; v2: mappings)."""
    out = {}
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out[int(p["target"])] = p.get("host_ip", "0.0.0.0")
        else:
            parts = str(p).split("/")[0].split(":")
            out[int(parts[-1])] = parts[0] if len(parts) == 3 else "0.0.0.0"
    return out


def test_compose_file_is_valid_and_wires_the_stack(compose):
    from click import Context
    from mlflow.cli import cli as mlflow_cli

    from sweeper.cli import main

    services, named = compose["services"], set(compose.get("volumes", {}))
    pg, server, worker = services["postgres"], services["mlflow"], services["worker"]

    # One PostgreSQL, two databases: Optuna's (POSTGRES_DB) and MLflow's (created by the init script).
    optuna_db, user = pg["environment"]["POSTGRES_DB"], pg["environment"]["POSTGRES_USER"]
    init = volumes(pg)["/docker-entrypoint-initdb.d/init.sql"]
    assert "CREATE DATABASE mlflow" in (ROOT / "docker" / "postgres-init.sql").read_text() and init.endswith(
        "docker/postgres-init.sql")
    assert volumes(pg)["/var/lib/postgresql/data"] in named
    assert pg["environment"]["POSTGRES_PASSWORD"] == PASSWORD  # from the environment

    # The MLflow server: the installed mlflow accepts its arguments; the PostgreSQL backend store comes by
    # environment (MLFLOW_BACKEND_STORE_URI, which `mlflow server` reads), not by argument; UI on 5000;
    # artifacts served (proxied) from a named volume.
    args = words(server["command"])
    assert words(server["entrypoint"]) == ["mlflow"] and args[0] == "server"
    command = mlflow_cli.get_command(Context(mlflow_cli), "server")
    parsed = command.make_context("server", args[1:]).params
    (store_option,) = [p for p in command.params if p.name == "backend_store_uri"]
    assert store_option.envvar == "MLFLOW_BACKEND_STORE_URI" and "--backend-store-uri" not in args
    assert server["environment"]["MLFLOW_BACKEND_STORE_URI"] == \
        f"postgresql+psycopg2://{user}:{PASSWORD}@postgres:5432/mlflow"
    assert parsed["serve_artifacts"] is True and parsed["port"] == 5000 and parsed["host"] == "0.0.0.0"
    assert volumes(server)[parsed["artifacts_destination"]] in named
    assert 5000 in ports(server)
    worker_uri = worker["environment"]["MLFLOW_TRACKING_URI"]
    assert worker_uri == "http://mlflow:5000"
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"

    # Workers: the sweeper image, a command our CLI parses, Optuna on the same PostgreSQL, started once
    # the server answers, a real init to pass SIGTERM on.
    command = words(worker["command"])
    assert command[0] == "worker"
    main.get_command(Context(main), "worker").make_context("worker", command[1:])  # raises on a bad option
    assert worker["environment"]["SWEEPER_STORAGE"] == \
        f"postgresql+psycopg2://{user}:{PASSWORD}@postgres:5432/{optuna_db}"
    assert worker["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert worker.get("init") is True and volumes(worker)["/app/mlruns"] in named
    assert "build" in worker and worker.get("image") == server.get("image")


def test_no_password_in_the_file_and_none_means_no_stack(tmp_path):
    """The password is only in the environment (or .env, from .env.example): Compose refuses the file
    without one, naming the variable."""
    text = (ROOT / "docker-compose.yml").read_text()
    assert "sweeper:sweeper@" not in text and "POSTGRES_PASSWORD: sweeper" not in text
    out = resolve(tmp_path)
    assert out.returncode != 0 and "POSTGRES_PASSWORD" in out.stderr
    example = ROOT / ".env.example"
    values = dict(line.split("=", 1) for line in example.read_text().splitlines() if line and line[0] != "#")
    assert values["POSTGRES_PASSWORD"] == "" and values["SWEEPER_BIND"] == "127.0.0.1"
    out = resolve(tmp_path, env_file=str(example))  # .env.example as it is: no password yet
    assert out.returncode != 0 and "POSTGRES_PASSWORD" in out.stderr
    out = resolve(tmp_path, env_file=str(example), POSTGRES_PASSWORD=PASSWORD)
    assert out.returncode == 0, out.stderr


def test_ports_are_published_on_loopback_unless_multi_machine(compose, tmp_path):
    services = compose["services"]
    assert ports(services["postgres"]) == {5432: "127.0.0.1"} and ports(services["mlflow"]) == {5000: "127.0.0.1"}
    assert not ports(services["worker"])
    wide = config(tmp_path, SWEEPER_BIND="0.0.0.0")["services"]
    assert ports(wide["postgres"]) == {5432: "0.0.0.0"} and ports(wide["mlflow"]) == {5000: "0.0.0.0"}


@pytest.mark.parametrize("host, allowed", [
    ("mlflow:5000", True), ("localhost:5000", True), ("127.0.0.1:5000", True), ("[::1]:5000", True),
    ("10.1.2.3:5000", True), ("172.16.0.5:5000", True), ("172.20.1.1:5000", True), ("172.31.255.254:5000", True),
    ("192.168.1.20:5000", True),
    ("172.15.0.1:5000", False), ("172.32.0.1:5000", False), ("172.160.0.1:5000", False),  # outside 172.16.0.0/12
    ("8.8.8.8:5000", False), ("192.169.1.1:5000", False), ("11.0.0.1:5000", False),
    ("evil.example:5000", False), ("10.evil.example:5000", False), ("172.16.evil.example:5000", False),
    ("192.168.1.1.evil.example:5000", False), ("mlflow.evil.example:5000", False),
])
def test_mlflow_allows_loopback_and_private_hosts_only(compose, host, allowed):
    """MLflow's own matcher (fnmatch patterns against "host:port") on the list the server gets."""
    from mlflow.server.security_utils import is_allowed_host_header

    listed = compose["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"]
    patterns = [h.strip() for h in listed.split(",")]
    assert "*" not in patterns
    assert is_allowed_host_header(patterns, host) is allowed


def test_public_host_is_allowed_when_named(tmp_path):
    from mlflow.server.security_utils import is_allowed_host_header

    env = config(tmp_path, SWEEPER_PUBLIC_HOST="mlflow.example.org")["services"]["mlflow"]["environment"]
    assert is_allowed_host_header(env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(","), "mlflow.example.org:5000")


def test_dockerfile_copies_what_the_install_needs_and_drops_root():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    copied = [w for line in lines if line.startswith("COPY ") for w in line.split()[1:-1]]
    assert {"setup.cfg", "pyproject.toml", "README.md", "trainers", "sweeper"} <= set(copied)
    assert all((ROOT / c).exists() for c in copied)
    assert any("pip install" in line and "[postgres]" in line for line in lines)  # psycopg2 for both services
    users = [i for i, line in enumerate(lines) if line.startswith("USER ")]
    assert users and lines[users[-1]].split()[1] not in ("root", "0", "0:0")  # the last USER is not root
    install = max(i for i, line in enumerate(lines) if "pip install" in line)
    assert users[-1] > install and not any(line.startswith("RUN ") for line in lines[users[-1]:])
    text = "\n".join(lines)
    for mount in ("/app/data", "/app/mlruns", "/mlartifacts"):  # the volumes' mount points: the user's
        assert mount in text.split("chown", 1)[1]
    assert ".env" in (ROOT / ".dockerignore").read_text().split()
