"""docker-compose.yml as Compose itself reads it (`docker compose config`, or the standalone
`docker-compose config`: both validate the file against the Compose schema and resolve it without a
Docker engine), checked against what the stack needs: one PostgreSQL for Optuna's storage and MLflow's
backend store, an MLflow server that proxies artifacts into a volume and answers the workers' Host
header, workers whose command our CLI accepts. Skipped when no Compose client is installed."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest
import yaml
from conftest import ROOT


def compose_client() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> dict:
    client = compose_client()
    if client is None:
        pytest.skip("no Compose client (`docker compose` plugin or `docker-compose`) is installed")
    env = {k: v for k, v in os.environ.items() if k not in ("STUDY", "SWEEPER_PUBLIC_HOST")}  # the file's defaults
    out = subprocess.run([*client, "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, f"{' '.join(client)} config rejected docker-compose.yml:\n{out.stderr}"
    return yaml.safe_load(out.stdout)


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

    # The MLflow server: the installed mlflow accepts its arguments; PostgreSQL backend; UI on 5000;
    # artifacts served (proxied) from a named volume; the Host header the workers send is allowed.
    args = words(server["command"])
    assert words(server["entrypoint"]) == ["mlflow"] and args[0] == "server"
    parsed = mlflow_cli.get_command(Context(mlflow_cli), "server").make_context("server", args[1:]).params
    assert parsed["backend_store_uri"] == f"postgresql+psycopg2://{user}:{pg['environment']['POSTGRES_PASSWORD']}@postgres:5432/mlflow"
    assert parsed["serve_artifacts"] is True and parsed["port"] == 5000 and parsed["host"] == "0.0.0.0"
    assert volumes(server)[parsed["artifacts_destination"]] in named
    assert any(str(p.get("published") if isinstance(p, dict) else p).split(":")[0] == "5000" for p in server["ports"])
    allowed = server["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    worker_uri = worker["environment"]["MLFLOW_TRACKING_URI"]
    assert worker_uri == "http://mlflow:5000" and "mlflow:*" in allowed
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"

    # Workers: the sweeper image, a command our CLI parses, Optuna on the same PostgreSQL, started once
    # the server answers, a real init to pass SIGTERM on.
    command = words(worker["command"])
    assert command[0] == "worker"
    main.get_command(Context(main), "worker").make_context("worker", command[1:])  # raises on a bad option
    assert worker["environment"]["SWEEPER_STORAGE"] == f"postgresql+psycopg2://{user}:sweeper@postgres:5432/{optuna_db}"
    assert worker["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert worker.get("init") is True and volumes(worker)["/app/mlruns"] in named
    assert "build" in worker and worker.get("image") == server.get("image")


def test_dockerfile_copies_what_the_install_needs():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    copied = [w for line in lines if line.startswith("COPY ") for w in line.split()[1:-1]]
    assert {"setup.cfg", "pyproject.toml", "README.md", "trainers", "sweeper"} <= set(copied)
    assert all((ROOT / c).exists() for c in copied)
    assert any("pip install" in line and "[postgres]" in line for line in lines)  # psycopg2 for both services
