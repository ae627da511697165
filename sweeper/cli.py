"""The `sweeper` command line. Heavy imports (torch, mlflow, optuna) happen inside the commands."""
from __future__ import annotations

import json
import os
import sys

import click


class CLIError(click.ClickException):
    """Shown as `error: <message>` with exit code 2."""

    exit_code = 2

    def format_message(self) -> str:
        return self.message

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def user_errors():
    """Config, data and tracking problems become one clear line instead of a traceback."""
    from trainers.config import ConfigError, DataNotFoundError
    from .tracking import TrackingError

    return (ConfigError, DataNotFoundError, TrackingError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sweeper")
def main() -> None:
    """Studies of distributed deep-learning training: Optuna drives, MLflow records."""


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set optim.lr=0.01 (repeatable).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else "
              "mlflow.db in the state directory: $SWEEPER_STATE_DIR, else the nearest mlruns/ here or above, "
              "else ./mlruns].")
@click.option("--experiment", default="sweeper-train", show_default=True, help="MLflow experiment name.")
@click.option("--run-name", default=None, help="MLflow run name [default: dataset-model-optimizer].")
@click.option("--checkpoint-dir", default=None, type=click.Path(file_okay=False),
              help="Checkpoint every epoch here; a rerun with the same directory resumes.")
@click.option("--no-track", is_flag=True, help="Do not log to MLflow.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
def train(config, overrides, tracking_uri, experiment, run_name, checkpoint_dir, no_track, as_json):
    """Train one CONFIG (YAML; defaults when omitted) and log it to MLflow."""
    if not no_track:  # an unusable tracking URI is an error at once, before torch's import (seconds)
        from .uris import tracking_uri as resolve

        try:
            resolve(tracking_uri)
        except user_errors() as err:
            raise CLIError(str(err)) from None
    from .run import run_training, silent_rank

    try:
        result, run_id, uri = run_training(config, list(overrides), tracking_uri=tracking_uri, experiment=experiment,
                                           run_name=run_name, checkpoint_dir=checkpoint_dir, track=not no_track,
                                           quiet=as_json)
    except user_errors() as err:
        raise CLIError(str(err)) from None
    if silent_rank():
        return
    from .uris import public

    if as_json:
        click.echo(json.dumps({**result.to_dict(), "mlflow_run_id": run_id, "tracking_uri": public(uri) or None}))
        return
    s = result.summary()
    click.echo(f"status {s['status']}: {s['epochs_completed']} epochs in {s['total_time']:.1f} s on {s['device']}")
    if "final_eval_acc" in s:
        click.echo(f"eval accuracy {s['final_eval_acc']:.2f}% (best {s['best_eval_acc']:.2f}%), eval loss "
                   f"{s['final_eval_loss']:.4f}, {s['mean_images_per_sec']:.0f} training images/s")
    if run_id:
        click.echo(f"MLflow run {run_id} in experiment '{experiment}' at {public(uri)}")
        if uri.startswith("sqlite:"):
            click.echo("see it in the UI: sweeper server  (then open http://127.0.0.1:5000)")


@main.command()
@click.option("--steps", default=100, show_default=True, help="Timed training steps per row.")
@click.option("--warmup", default=10, show_default=True, help="Untimed steps before timing.")
@click.option("--repeats", default=3, show_default=True, help="Interleaved repeats of every row (median kept).")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--model", default="lenet5", show_default=True)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--loader-workers", default=2, show_default=True, help="DataLoader processes of baseline (a).")
@click.option("--workers", "worker_counts", default="2,4,8", show_default=True,
              help="K of the K-worker rows (comma-separated; empty for none).")
@click.option("--study", "study_bench", is_flag=True,
              help="Instead: the overhead of `sweeper study run` (Optuna, MLflow, checkpoints) over bare train() "
                   "calls of the same grid, end to end, interleaved repeats (see sweeper/bench_study.py).")
@click.option("--trials", default=8, show_default=True, help="--study: grid points (one lr each).")
@click.option("--epochs", default=5, show_default=True, help="--study: epochs per trial.")
@click.option("--trial-seconds", default=10.0, show_default=True,
              help="--study: training seconds per trial the data size is calibrated to.")
@click.option("--train-size", default=None, type=click.IntRange(min=1),
              help="--study: training images per epoch (skips the calibration).")
@click.option("--dataset", default="synthetic", show_default=True, type=click.Choice(["synthetic", "fashion-mnist"]),
              help="--study: data of the trials.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="torch intra-op threads [default: torch's own; --study: 1, for both arms].")
@click.option("--fresh-stores", is_flag=True, help="--study: new Optuna/MLflow stores every repeat (a first study).")
@click.option("--keep", "keep_dir", default=None, type=click.Path(file_okay=False),
              help="--study: keep the stores, specs and logs in this directory.")
@click.option("--with-report", is_flag=True, help="--study: time the report the study builds when it completes too.")
@click.option("--fixed-costs", is_flag=True,
              help="Instead: the study layer's fixed costs (status, list, rerun, final delivery, --workers 2) "
                   "beside the bare Optuna/MLflow calls, interleaved repeats (see sweeper/bench_costs.py).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object on stdout.")
def bench(steps, warmup, repeats, batch_size, model, device, loader_workers, worker_counts, study_bench, trials,
          epochs, trial_seconds, train_size, dataset, threads, fresh_stores, keep_dir, with_report, fixed_costs,
          as_json):
    """Training throughput side by side: Poiatti et al.'s DataLoader loop vs the trainer core,
    K-worker backends, GFLOP/s against the device's matmul peak. With --study: what a study's
    orchestration costs over bare training of the same trials."""
    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    if fixed_costs:
        from .bench_costs import CostBenchSettings, run_cost_bench

        result = run_cost_bench(CostBenchSettings(repeats=repeats), log=log)
        if as_json:
            click.echo(json.dumps(result))
        return
    if study_bench:
        from .bench_study import StudyBenchSettings, run_study_bench

        s = StudyBenchSettings(trials=trials, epochs=epochs, trial_seconds=trial_seconds, train_size=train_size,
                               repeats=repeats, model=model, dataset=dataset, batch_size=batch_size,
                               device="cpu" if device == "auto" else device, threads=threads or 1,
                               fresh_stores=fresh_stores, workdir=keep_dir, report=with_report)
        try:
            result = run_study_bench(s, log=log)
        except user_errors() as err:
            raise CLIError(str(err)) from None
        if as_json:
            click.echo(json.dumps(result))
        return
    import torch

    from trainers.bench import BenchSettings, run_bench

    if threads:
        torch.set_num_threads(threads)
    counts = tuple(int(k) for k in worker_counts.split(",") if k.strip())
    s = BenchSettings(steps=steps, warmup=warmup, repeats=repeats, batch_size=batch_size, model=model, device=device,
                      loader_workers=loader_workers, workers=counts)
    try:
        result = run_bench(s, log=log, include_workers=bool(counts))
    except user_errors() as err:
        raise CLIError(str(err)) from None
    if as_json:
        click.echo(json.dumps(result))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--backend-store-uri", default=None, envvar="MLFLOW_BACKEND_STORE_URI", show_envvar=True,
              help="The database MLflow stores runs in [default: mlflow.db in the state directory: "
                   "$SWEEPER_STATE_DIR, else the nearest mlruns/ here or above, else ./mlruns]. With a password "
                   "in it, prefer the environment variable: `ps` shows arguments to every user.")
@click.option("--study", "study_name", default=None, metavar="NAME",
              help="Print only the link to this study's experiment (an error if the store has none).")
@click.option("--allowed-hosts", default=None, metavar="HOSTS",
              help="Comma-separated Host headers the server accepts (MLflow's --allowed-hosts; default: "
                   "localhost and private IPs). Needed to reach it by a public name or address.")
@click.option("--workers", default=None, metavar="N", help="Server worker processes (mlflow server --workers).")
def server(host, port, backend_store_uri, study_name, allowed_hosts, workers):
    """Start a real MLflow tracking server + UI on the local store, and print a link per study: it opens
    the study's trials compared (one row per trial, the objective and varied parameters as columns,
    ordered by the objective; charts led by the objective's and the loss's curves)."""
    from pathlib import Path

    from .tracking import TrackingError, artifact_root
    from .uris import default_tracking_uri, public, tracking_uri

    try:
        uri = tracking_uri(backend_store_uri or default_tracking_uri())
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else uri
        if scheme in ("http", "https", "databricks"):
            raise TrackingError(f"--backend-store-uri {public(uri)}: a server stores runs in a database "
                                f"(sqlite:///PATH.db, postgresql://...), not in another server")
        from .mlflow_store import prepare

        prepare(uri)  # built aside and moved into place: a server killed at start leaves no half store
        # A local store answers at once; a database server that is down would hold the server's start
        # for minutes in MLflow's connection retries: its studies are listed only when one is asked for.
        local = uri.startswith("sqlite:")
        links = study_links(uri, host, port, study_name) if local or study_name else []
    except TrackingError as err:
        raise CLIError(str(err)) from None
    # The store goes by environment (`mlflow server` reads MLFLOW_BACKEND_STORE_URI), not by argument:
    # the URI may hold a password, and `ps` shows every process's arguments to every user.
    args = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port)]
    if allowed_hosts:
        args += ["--allowed-hosts", allowed_hosts]
    if workers:
        args += ["--workers", str(workers)]
    root = artifact_root(uri)
    if root:
        Path(root[len("file://"):]).mkdir(parents=True, exist_ok=True)
        args += ["--default-artifact-root", root]
    from .mlflow_ui import browse_host

    click.echo(f"MLflow UI at http://{browse_host(host)}:{port} (store {public(uri)}); Ctrl-C stops it", err=True)
    for name, link in links:
        click.echo(f"study {name}: {link}")
    if not local and not study_name:
        click.echo("a study's comparison view: sweeper server --study NAME (same options)", err=True)
    sys.stdout.flush()
    os.execve(sys.executable, args, {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri})


def study_links(uri: str, host: str, port: int, study_name: str | None) -> list[tuple[str, str]]:
    """(study, link) of the studies the store holds (or of `study_name`: a TrackingError if it has none)."""
    from mlflow.tracking import MlflowClient

    from .mlflow_ui import browse_host
    from .mlflow_ui import study_links as links_of
    from .tracking import TrackingError

    links = links_of(MlflowClient(tracking_uri=uri), f"http://{browse_host(host)}:{port}", study_name)
    if study_name is not None and not links:
        raise TrackingError(f"--study {study_name}: no such study in this store (run it first: "
                            f"sweeper study run SPEC)")
    return links


from .study_cli import study, worker  # noqa: E402
main.add_command(study)
main.add_command(worker)


if __name__ == "__main__":  # pragma: no cover
    main()
