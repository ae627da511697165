"""One tracked training run: a config in, an MLflow run with params, per-epoch metrics and artifacts out."""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .tracking import STATE_DIR, RunLogger, connect, logger_for, replay_spool, start_run

SYSTEM_METRICS_INTERVAL = float(os.environ.get("SWEEPER_SYSTEM_METRICS_INTERVAL", "2"))
DATA_LINE = re.compile(r"(?P<name>[\w.-]+): (?P<train>\d+) train / (?P<eval>\d+) (?P<split>\w+) examples of "
                       r"(?P<channels>\d+)x(?P<size>\d+)x\d+, (?P<classes>\d+) classes, from (?P<source>.+)$")


def dataset_inputs(cfg, data: dict) -> list[dict]:
    """The trial's data as MLflow dataset inputs: the training part and the evaluated part (the validation
    split or the test set), each with its number of examples. The digest identifies the examples the
    trainer selected (dataset, source, split, its seed and fraction, subset), not the bytes: hashing
    the images would cost the study seconds per trial."""
    import hashlib

    d = cfg.data
    out = []
    for context, count in (("train", data["train"]), (data["split"], data["eval"])):
        ident = json.dumps([data["name"], data["source"], d.split, d.val_fraction if d.split == "val" else None,
                            cfg.seed if d.split == "val" else None, d.subset, context, count])
        profile = {"num_examples": count, "classes": data["classes"],
                   "shape": [data["channels"], data["size"], data["size"]], "split": context}
        schema = {"mlflow_tensorspec": {"features": json.dumps([{"name": "image", "type": "tensor", "tensor-spec": {
            "dtype": "uint8", "shape": [-1, data["channels"], data["size"], data["size"]]}}]),
            "targets": json.dumps([{"name": "label", "type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}}])}}
        out.append({"name": f"{data['name']}-{context}", "digest": hashlib.sha256(ident.encode()).hexdigest()[:8],
                    "source_type": "local" if data["source"].startswith("/") else "code", "source":
                    json.dumps({"uri": data["source"]} if data["source"].startswith("/") else {"tags": {
                        "sweeper.data": data["source"]}}),
                    "schema": json.dumps(schema), "profile": json.dumps(profile), "context": context})
    return out


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


def log_result(logger: RunLogger, result, run_id: str, stage: Path | None = None, once: bool = False) -> None:
    """Final figures as metrics at the last step, the status as a tag, the full result as JSON.
    `once`: log the final metrics only if the run lacks them (a resumed trial may have logged them)."""
    summary = result.summary()
    numbers = {f"final/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if once and numbers:
        logger.backfill([(result.epochs_completed, numbers)], key=next(iter(numbers)))
    else:
        logger.log_metrics(numbers, step=result.epochs_completed)
    logger.set_tags({"sweeper.status": result.status})
    path = (stage or run_dir(run_id)) / "result.json"
    path.write_text(json.dumps(result.to_dict(), indent=1, default=str))
    logger.log_artifact(path)


CURVE_KEYS = ("train_loss", "train_acc", "eval_loss", "eval_acc")
STEP_KEYS = ("local_steps_mean", "local_steps")  # K-worker runs: local steps per round, and J_t / p at the epoch's end


def curves(history) -> dict[str, list[float]]:
    """Per-epoch curves of a history, for plots and the trial's stored summary (NaN as None)."""
    out: dict[str, list] = {"epoch": [r.epoch for r in history]}
    for key in CURVE_KEYS:
        out[key] = [v if math.isfinite(v := getattr(r, key)) else None for r in history]
    for key in STEP_KEYS:  # the averaging period of the K-worker engine: J_t's trajectory (Poiatti et al., Table 6)
        if history and all(key in r.extra for r in history):
            out[key] = [v if math.isfinite(v := float(r.extra[key])) else None for r in history]
    return out


class TrackedRun:
    """The MLflow side of one study trial: a nested child run that outlives the process.

    The run is opened in the background (`RunLogger(create=...)`, in the study's courier process): reused
    when its id is known, found by its key tag when a killed process created it without recording the id,
    created otherwise. Training never waits for MLflow; what is not delivered when the study ends is
    spooled."""

    def __init__(self, client, experiment: str, key: str, run_name: str, parent: RunLogger | None,
                 run_id: str | None = None, tags: dict | None = None, start_time: float | None = None,
                 system_metrics: bool = True):
        self.stage = STATE_DIR / "runs" / key.replace("/", "-")
        self.stage.mkdir(parents=True, exist_ok=True)
        self.started = time.time() if start_time is None else start_time  # when the trial began, not the delivery
        self.data: dict[str, Any] | None = None  # what the trainer said of its data (see data_log)
        self.data_logged, self.cfg = False, None
        self.logger = logger_for(client, run_id, create={
            "experiment": experiment, "run_name": run_name, "parent": parent, "key": key,
            "start_time": int(self.started * 1000),
            "tags": {"sweeper.kind": "trial", **{k: str(v) for k, v in (tags or {}).items()}}})
        if system_metrics and SYSTEM_METRICS_INTERVAL > 0:  # SWEEPER_SYSTEM_METRICS_INTERVAL=0: none
            self.logger.system_metrics(SYSTEM_METRICS_INTERVAL)

    @property
    def run_id(self) -> str | None:
        return self.logger.run_id

    def start(self, cfg, tags: dict, restored=()) -> None:
        """Params, tags, the resolved config; epochs a checkpoint holds but the run may lack."""
        self.cfg = cfg
        self.logger.set_tags(tags)
        self.logger.log_params(cfg.flat())
        path = self.stage / "config.yaml"
        path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.logger.log_artifact(path)
        if restored:
            self.logger.backfill([(r.epoch, r.metrics(finite=False)) for r in restored], key="epoch_time")

    def epoch(self, report, once: bool = False) -> None:
        """Log one epoch; with `once`, only if the run lacks it. A retried trial's run may hold epochs
        its checkpoint does not: train() reports an epoch while its checkpoint is still being written,
        so a kill in that window leaves the epoch in MLflow and the retry trains and reports it again."""
        if not self.data_logged:
            self.log_data()
        if once:
            self.logger.backfill([(report.epoch, report.metrics(finite=False))], key="epoch_time")
        else:
            self.logger.log_metrics(report.metrics(finite=False), step=report.epoch)

    def data_log(self, log):
        """`log` for train(): also reads the trainer's line about its data ("NAME: N train / M val
        examples of CxHxW, K classes, from SOURCE") and logs the data as MLflow dataset inputs."""
        def on_line(message, *args, **kwargs):
            found = DATA_LINE.match(str(message)) if self.data is None else None
            if found:
                self.data = {k: (int(v) if v.isdigit() else v) for k, v in found.groupdict().items()}
            return log(message, *args, **kwargs)

        return on_line

    def log_data(self, cfg=None) -> None:
        cfg = cfg or self.cfg
        if self.data is not None and cfg is not None and not self.data_logged:
            self.logger.log_inputs(dataset_inputs(cfg, self.data))
            self.data_logged = True

    def finish(self, result, tags: dict, title: str, cfg=None, checkpoint_dir: Path | None = None,
               objective: float | None = None) -> None:
        """The final figures and the run's end; with `checkpoint_dir`, the trained model (built and logged
        by the courier from the trial's last checkpoint: nothing here waits for it)."""
        log_result(self.logger, result, self.run_id, stage=self.stage, once=True)
        if objective is not None and math.isfinite(objective):
            self.logger.backfill([(result.epochs_completed, {"objective": objective})], key="objective")
        cfg = cfg or self.cfg
        if cfg is not None:
            self.log_data(cfg)
        if cfg is not None and checkpoint_dir is not None and self.data is not None and result.history:
            self.logger.log_model(Path(checkpoint_dir), {
                "config": cfg.to_dict(), "input_shape": [self.data["channels"], self.data["size"],
                                                         self.data["classes"]],
                "epoch": result.epochs_completed, "eval_acc": result.history[-1].eval_acc,
                "dataset": self.data["name"]})
        self.logger.log_plot(self.stage / "curves.png", curves(result.history), title)
        self.end("FINISHED", tags)

    def end(self, status: str, tags: dict | None = None) -> None:
        if tags:
            self.logger.set_tags(tags)
        self.logger.end(status)


@contextmanager
def progress_bar(epochs: int, enabled: bool = True, study=None):
    """A rich progress bar on stderr in a terminal; into a file or pipe (nohup, Slurm logs) plain lines,
    one per epoch and per message, never wrapped and with no progress frame. Each epoch says the run's
    ETA at its mean epoch time; `study` (a study.progress.StudyRow) adds the study's row: trials done,
    ETA. Yields (on_progress, on_epoch_line, log)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .study.progress import duration_label

    if not enabled:
        yield (None, lambda line: None, lambda msg: None)
        return
    times: list[float] = []  # seconds of each epoch so far

    def timing(report) -> tuple[float | None, float | None]:
        times.append(report.epoch_time)
        mean = sum(times) / len(times)
        return mean * (epochs - report.epoch), mean * epochs

    def line(report, left: float | None) -> str:
        return (f"epoch {report.epoch:>3}/{epochs}  train loss {report.train_loss:.4f} acc {report.train_acc:5.2f}%  "
                f"eval loss {report.eval_loss:.4f} acc {report.eval_acc:5.2f}%  lr {report.lr:.3g}  "
                f"{report.images_per_sec:,.0f} img/s" + (f"  ETA {duration_label(left)}" if report.epoch < epochs else ""))

    console = Console(stderr=True)
    if not console.is_terminal:
        def plain(message) -> None:
            print(message, file=sys.stderr, flush=True)

        def plain_epoch(report) -> None:
            left, total = timing(report)
            row = f"  ({study.text(left, total)})" if study is not None else ""
            plain(line(report, left) + row)

        yield (None, plain_epoch, plain)
        return
    # Redrawn 4 times a second (rich's default is 10: each redraw renders the bar in this, the training,
    # process).
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=console, transient=False, refresh_per_second=4) as bar:
        row = None if study is None else bar.add_task(
            f"study {study.status.name}", total=study.total, completed=study.done, info=study.eta(None, None))
        task = bar.add_task(f"epoch 1/{epochs}", total=None, info="")
        state = {"epoch": 0}

        def on_progress(step: int, total: int) -> None:
            bar.update(task, total=total, completed=step, description=f"epoch {state['epoch'] + 1}/{epochs}")

        def on_epoch_line(report) -> None:
            state["epoch"] = report.epoch
            left, total = timing(report)
            bar.update(task, info=f"{report.images_per_sec:,.0f} img/s, run ETA {duration_label(left)}")
            if row is not None:
                bar.update(row, info=study.eta(left, total))
            bar.console.print(line(report, left), soft_wrap=True)

        yield (on_progress, on_epoch_line, lambda message: bar.console.print(message, soft_wrap=True))


def silent_rank() -> bool:
    """A torchrun rank other than 0: it trains its worker; rank 0 prints and tracks."""
    return os.environ.get("RANK", "0") != "0"


def run_training(config_path, overrides, tracking_uri=None, experiment="sweeper-train", run_name=None,
                 checkpoint_dir=None, track=True, quiet=False):
    """Validate, open the MLflow run, train with a progress bar, log everything. Returns
    (TrainResult, run_id or None, tracking URI)."""
    from trainers.config import TrainConfig
    from trainers.train import train

    cfg = TrainConfig.from_yaml(config_path, overrides)  # fails before anything is created
    if silent_rank():
        track, quiet = False, True
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
                    logger.log_metrics(report.metrics(finite=False), step=report.epoch)
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


# --------------------------------------------------------------------------------------------------
# A study trial's figures

from trainers.results import ADDITIVE  # noqa: E402 - run totals: the metrics declared additive


def trial_summary(history, status: str) -> dict[str, Any]:
    """Final figures of a trial for its user attrs (and reports): last epoch, best epoch, and per-run
    totals summed over *all* epochs, including those before a resume. Summed here rather than taken from
    TrainResult.totals because centralized runs have no engine totals and epoch/eval times are in none."""
    out: dict[str, Any] = {"status": status, "epochs": len(history)}
    if not history:
        return out
    last = history[-1].metrics()
    out.update({f"final_{k}": v for k, v in last.items() if k in CURVE_KEYS})
    accs = [r.eval_acc for r in history if math.isfinite(r.eval_acc)]
    if accs:
        out["best_eval_acc"] = max(accs)
    for key in ADDITIVE:
        values = [r.metrics().get(key) for r in history]
        if any(v is not None for v in values):
            out[key] = sum(v for v in values if v is not None)
    return out


def objective_value(spec, result) -> float:
    """The trial's value: the worst one when it diverged; a run total when the metric is one (e.g.
    comm_time_modeled); else the metric at the final (or best) epoch."""
    obj = spec.objective
    if result.status == "diverged":
        return obj.worst()
    total = trial_summary(result.history, result.status).get(obj.metric)
    if obj.metric in ADDITIVE and total is not None:
        return float(total)
    series = [r.metrics()[obj.metric] for r in result.history if obj.metric in r.metrics()]
    summary = result.summary().get(obj.metric)
    if not series and isinstance(summary, (int, float)) and math.isfinite(summary):
        return float(summary)  # e.g. total_time
    if not series:
        known = sorted(result.history[-1].metrics()) if result.history else []
        raise ValueError(f"objective.metric {obj.metric!r} was not reported by this run (it reports: "
                         f"{', '.join(known)})")
    if obj.mode == "best":
        return max(series) if obj.direction == "maximize" else min(series)
    return series[-1]


def restored_history(ckpt_dir: Path) -> list:
    """The epochs a checkpoint holds (they are not reported again by train(), so we log them)."""
    from trainers.checkpoints import checkpoint_history

    return checkpoint_history(ckpt_dir)
