"""The trainer core: data, models, optimizers, schedules, the K-worker engine.

It takes a validated config and a callback and returns a result; it knows nothing of Optuna, MLflow
or Click (those live in `sweeper`).
"""
from .config import ConfigError, TrainConfig
from .results import EpochReport, TrainResult
from .train import train

__all__ = ["ConfigError", "EpochReport", "TrainConfig", "TrainResult", "train"]
