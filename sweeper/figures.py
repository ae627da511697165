"""One number format per metric: every report, table and console line writes a figure with `fmt`."""
from __future__ import annotations

import math
import numbers
from typing import Any

from trainers.results import BY_NAME, Metric

# Decimals of a metric's figures by its unit (a loss has 4; a count without unit, none).
DECIMALS = {"%": 2, "s": 1, "img/s": 1, "B": 0}


def metric_of(name: str) -> Metric | None:
    """The declared metric a figure is of: eval_acc for eval_acc, final_eval_acc and best_eval_acc."""
    for prefix in ("", "final_", "best_", "mean_"):
        if name.startswith(prefix) and name[len(prefix):] in BY_NAME:
            return BY_NAME[name[len(prefix):]]
    return None


def fmt(name: str, value: Any) -> str:
    """`value` of metric `name` as every table and plot writes it: accuracy 2 decimals, loss 4, times 1
    (seconds, the unit in the title; 3 significant digits under one second), counts whole, anything else
    4 significant digits; `-` for none."""
    if value is None or not isinstance(value, numbers.Real) or isinstance(value, bool):
        return "-" if value is None else str(value)
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return str(float(value))
    digits = _decimals(name)
    if digits == 1 and 0 < abs(value) < 1:  # seconds under one (a modeled all-reduce): 3 significant digits
        return f"{value:.3g}"
    return f"{value:.{digits}f}" if digits is not None else f"{value:.4g}"


def _decimals(name: str) -> int | None:
    metric = metric_of(name)
    if metric is None:
        return 1 if name.endswith("_time") else None  # total_time
    if metric.name.endswith("loss"):
        return 4
    return DECIMALS.get(metric.unit, 0 if metric.additive and not metric.unit else None)


def fmt_spread(name: str, mean: Any, std: Any) -> str:
    """`mean ± std`, the spread to the mean's own decimals (`18.4 ± 0.1`, not `18.4 ± 0.0585`)."""
    text = fmt(name, mean)
    if std is None or not isinstance(std, numbers.Real) or math.isnan(std):
        return text
    decimals = len(text.split(".")[1]) if "." in text and text.replace(".", "").replace("-", "").isdigit() else None
    return f"{text} ± {std:.{decimals}f}" if decimals is not None else f"{text} ± {fmt(name, std)}"
