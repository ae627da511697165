"""What a training run reports: one EpochReport per epoch, one TrainResult at the end."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
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

    def metrics(self) -> dict[str, float]:
        """Flat name -> value, for MLflow and Optuna (`step=epoch`)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("epoch", "extra")}
        out.update(self.extra)
        return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


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
