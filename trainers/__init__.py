"""The trainer core: data, models, optimizers, schedules, the K-worker engine.

It takes a validated config and a callback and returns a result; it knows nothing of Optuna, MLflow
or Click (those live in `sweeper`). Training itself is `trainers.train.train(cfg, ...)`.

The package imports only what needs no torch (configs, results): validating a spec or reading a
study's status does not pay torch's import, and a study starts its MLflow courier before that import.
"""
from .config import ConfigError, TrainConfig
from .results import EpochReport, TrainResult

__all__ = ["ConfigError", "EpochReport", "TrainConfig", "TrainResult"]
