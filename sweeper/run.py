"""One tracked training run: a config in, an MLflow run with params, per-epoch metrics and artifacts out."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import yaml

from .tracking import STATE_DIR, RunLogger, connect, replay_spool, start_run


def default_run_name(cfg) -> str:
    name = f"{cfg.data.dataset}-{cfg.model.name}-{cfg.optim.name}"
    if cfg.distributed.enabled:
        name += f"-{cfg.distributed.algorithm}-K{cfg.distributed.workers}"
    return name


def run_dir(run_id: str) -> Path:
    """Where a run's artifacts wait for delivery (the logger uploads them asynchronously)."""
    path = STATE_DIR / "runs" / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_config(logger: RunLogger, cfg, run_id: str) -> None:
    logger.log_params(cfg.flat())
    path = run_dir(run_id) / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    logger.log_artifact(path)


def log_result(logger: RunLogger, result, run_id: str) -> None:
    """Final figures as metrics at the last step, the status as a tag, the full result as JSON."""
    summary = result.summary()
    numbers = {f"final/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    logger.log_metrics(numbers, step=result.epochs_completed)
    logger.set_tags({"sweeper.status": result.status})
    path = run_dir(run_id) / "result.json"
    path.write_text(json.dumps(result.to_dict(), indent=1, default=str))
    logger.log_artifact(path)


@contextmanager
def progress_bar(epochs: int, enabled: bool = True):
    """A rich progress bar on stderr; yields (on_progress, on_epoch_line, log)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not enabled:
        yield (None, lambda line: None, lambda msg: None)
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task(f"epoch 1/{epochs}", total=None)
        state = {"epoch": 0}

        def on_progress(step: int, total: int) -> None:
            bar.update(task, total=total, completed=step, description=f"epoch {state['epoch'] + 1}/{epochs}")

        def on_epoch_line(report) -> None:
            state["epoch"] = report.epoch
            bar.console.print(f"epoch {report.epoch:>3}/{epochs}  train loss {report.train_loss:.4f} "
                              f"acc {report.train_acc:5.2f}%  eval loss {report.eval_loss:.4f} "
                              f"acc {report.eval_acc:5.2f}%  lr {report.lr:.3g}  {report.images_per_sec:,.0f} img/s")

        yield (on_progress, on_epoch_line, bar.console.print)


def run_training(config_path, overrides, tracking_uri=None, experiment="sweeper-train", run_name=None,
                 checkpoint_dir=None, track=True, quiet=False):
    """Validate, open the MLflow run, train with a progress bar, log everything. Returns
    (TrainResult, run_id or None, tracking URI)."""
    from trainers.config import TrainConfig
    from trainers.train import train

    cfg = TrainConfig.from_yaml(config_path, overrides)  # fails before anything is created
    logger, run_id, uri = None, None, None
    if track:
        client = connect(tracking_uri)
        uri = client.tracking_uri
        replay_spool(client)
        run_id = start_run(client, experiment, run_name or default_run_name(cfg), tags={"sweeper.kind": "train"})
        logger = RunLogger(client, run_id)
        log_config(logger, cfg, run_id)

    status = "FAILED"
    try:
        with progress_bar(cfg.epochs, enabled=not quiet) as (on_progress, on_epoch_line, log):
            def on_epoch(report) -> None:
                if logger is not None:
                    logger.log_metrics(report.metrics(), step=report.epoch)
                on_epoch_line(report)

            result = train(cfg, on_epoch=on_epoch, checkpoint_dir=checkpoint_dir, on_progress=on_progress, log=log)
        if logger is not None:
            log_result(logger, result, run_id)
        status = "FINISHED"
        return result, run_id, uri
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if logger is not None:
            logger.close(status)
