"""What a training run reports: one EpochReport per epoch, one TrainResult at the end, and which metric
names a given config reports (`reported_metrics`), so that a study's objective is checked before it runs."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .registry import ALGORITHMS

Status = Literal["completed", "diverged"]


@dataclass
class EpochReport:
    epoch: int  # 1-based: the number of epochs finished
    train_loss: float
    train_acc: float
    eval_loss: float
    eval_acc: float
    lr: float  # learning rate at the end of the epoch
    epoch_time: float  # seconds of training (evaluation excluded)
    eval_time: float
    images_per_sec: float  # training images (all workers) per second of epoch_time
    extra: dict[str, float] = field(default_factory=dict)  # engine figures: comm_rounds, compute_time, ...

    def metrics(self, finite: bool = True) -> dict[str, float]:
        """Flat name -> value, for MLflow and Optuna (`step=epoch`). `finite=False` keeps NaN and inf too
        (a diverged epoch's figures: MLflow records them, Optuna's reports take finite values only)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("epoch", "extra")}
        out.update(self.extra)
        return {k: float(v) for k, v in out.items()
                if isinstance(v, (int, float)) and (not finite or math.isfinite(v))}


@dataclass
class TrainResult:
    status: Status
    epochs_completed: int
    history: list[EpochReport]
    total_time: float  # seconds of this call (a resumed run counts only its own part)
    device: str
    totals: dict[str, float] = field(default_factory=dict)  # engine totals: comm_bytes, wall_time_modeled, ...
    state: dict[str, Any] = field(default_factory=dict)  # algorithm state: J trajectory, ADPSGD periods

    @property
    def final(self) -> EpochReport | None:
        return self.history[-1] if self.history else None

    def summary(self) -> dict[str, float | str]:
        """Final figures, for MLflow's final metrics and `--json`."""
        out: dict[str, float | str] = {"status": self.status, "epochs_completed": self.epochs_completed,
                                       "total_time": self.total_time, "device": self.device}
        if self.history:
            last = self.final
            out.update(final_train_loss=last.train_loss, final_train_acc=last.train_acc,
                       final_eval_loss=last.eval_loss, final_eval_acc=last.eval_acc,
                       best_eval_acc=max(r.eval_acc for r in self.history),
                       mean_images_per_sec=sum(r.images_per_sec for r in self.history) / len(self.history))
        out.update(self.totals)
        return out

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "history": [asdict(r) for r in self.history], "state": self.state}


# --------------------------------------------------------------------------------------------------
# Which metrics a config reports (torch-free: `sweeper study validate` checks a study's objective with it)



@dataclass(frozen=True)
class Metric:
    """One figure a run reports: spec validation, run totals, a study's objective and report labels all
    read it from here."""

    name: str
    label: str  # for tables and plots
    unit: str = ""
    additive: bool = False  # per-epoch values add up to a run total (a study's objective takes the total)
    scope: Literal["epoch", "engine", "controller"] = "epoch"  # engine: K-worker runs only; controller:
    # dynamic-local and adaptive-local only

    @property
    def title(self) -> str:
        return f"{self.label} [{self.unit}]" if self.unit else self.label


METRICS: tuple[Metric, ...] = (
    Metric("train_loss", "Train loss"),
    Metric("train_acc", "Train accuracy", "%"),
    Metric("eval_loss", "Eval loss"),
    Metric("eval_acc", "Eval accuracy", "%"),
    Metric("lr", "Learning rate"),
    Metric("epoch_time", "Training time", "s", additive=True),
    Metric("eval_time", "Evaluation time", "s", additive=True),
    Metric("images_per_sec", "Training images per second", "img/s"),
    Metric("compute_time", "Computation time", "s", additive=True, scope="engine"),
    Metric("compute_time_parallel", "Parallel computation time", "s", additive=True, scope="engine"),
    Metric("comm_rounds", "Communication rounds", additive=True, scope="engine"),
    Metric("comm_bytes", "Bytes sent per worker", "B", additive=True, scope="engine"),
    Metric("comm_time_measured", "Communication time", "s", additive=True, scope="engine"),
    Metric("comm_time_modeled", "Modeled communication time", "s", additive=True, scope="engine"),
    Metric("wall_time_modeled", "Modeled wall time", "s", additive=True, scope="engine"),
    Metric("local_steps_mean", "Local steps per round", scope="engine"),
    Metric("local_steps", "Local steps (J_t or period p)", scope="controller"),
)
BY_NAME = {m.name: m for m in METRICS}
ADDITIVE = tuple(m.name for m in METRICS if m.additive)
# The K-worker engine's per-epoch figures (`engine.WorkerRunner.train_epoch`, also its run totals);
# tests/test_validate.py checks them against the engine's source.
ENGINE_METRICS = tuple(m.name for m in METRICS if m.scope == "engine")
CONTROLLER_METRICS = tuple(m.name for m in METRICS if m.scope == "controller")
CONTROLLED = ALGORITHMS.tagged("controlled")


def epoch_metrics() -> tuple[str, ...]:
    """The numeric fields of every EpochReport (its `extra` adds the engine's figures)."""
    return tuple(f.name for f in fields(EpochReport) if f.name not in ("epoch", "extra"))


def summary_metrics() -> tuple[str, ...]:
    """The numeric figures of `TrainResult.summary()` of a run with at least one epoch (totals aside)."""
    report = EpochReport(epoch=1, train_loss=0.0, train_acc=0.0, eval_loss=0.0, eval_acc=0.0, lr=0.0, epoch_time=0.0,
                         eval_time=0.0, images_per_sec=0.0)
    summary = TrainResult(status="completed", epochs_completed=1, history=[report], total_time=0.0,
                          device="cpu").summary()
    return tuple(k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


def metrics_for(algorithm: str) -> tuple[str, ...]:
    """Every metric name a run with this `distributed.algorithm` reports: per epoch (EpochReport.metrics())
    and in its summary (TrainResult.summary(), engine totals included)."""
    names = list(epoch_metrics())
    if algorithm != "centralized":
        names += ENGINE_METRICS
        if algorithm in CONTROLLED:
            names += CONTROLLER_METRICS
    names += [k for k in summary_metrics() if k not in names]
    return tuple(names)


def reported_metrics(cfg: Any) -> tuple[str, ...]:
    """The metric names a run of TrainConfig `cfg` reports; a study's objective must be one of them."""
    return metrics_for(cfg.distributed.algorithm)


def all_metrics() -> tuple[str, ...]:
    """Every metric name some config reports."""
    return metrics_for(CONTROLLED[0])
