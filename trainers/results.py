"""What a training run reports: one EpochReport per epoch, one TrainResult at the end, and which metric
names a given config reports (`reported_metrics`), so that a study's objective is checked before it runs."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

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

# The K-worker engine's per-epoch figures (`trainers.engine.Engine.train_epoch`, also its run totals); only
# a run whose `distributed.algorithm` is not `centralized` has them. tests/test_validate.py checks this list
# against the engine's source.
ENGINE_METRICS = ("compute_time", "compute_time_parallel", "comm_rounds", "comm_bytes", "comm_time_measured",
                  "comm_time_modeled", "wall_time_modeled", "local_steps_mean")
# The engine's per-epoch J_t (dynamic-local) or averaging period p (adaptive-local) at the epoch's end.
CONTROLLER_METRICS = ("local_steps",)
CONTROLLED = ("dynamic-local", "adaptive-local")


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
