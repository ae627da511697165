"""`sweeper bench --study` runs end to end on a tiny setting (its figures are measured by the command
itself; no timing is asserted here)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sweeper.cli import main

pytestmark = pytest.mark.slow


def test_bench_study_runs_both_arms_and_reports_the_breakdown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    keep = tmp_path / "bench"
    result = CliRunner().invoke(main, ["bench", "--study", "--json", "--trials", "2", "--epochs", "2", "--train-size",
                                       "64", "--repeats", "1", "--model", "lenet5-classic", "--keep", str(keep)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["settings"]["trials"] == 2 and out["settings"]["train_size"] == 64
    assert len(out["samples"]["bare"]) == len(out["samples"]["study"]) == len(out["samples"]["plain"]) == 1
    for arm in ("bare", "study", "plain"):
        sample = out["samples"][arm][0]
        assert sample["trials"] == 2 and sample["epochs"] == 4 and sample["wall"] > sample["train"] > 0
        parts = sum(sample[k] for k in ("setup", "trial_costs", "epoch_costs", "between", "train", "teardown"))
        assert abs(parts - sample["wall"]) < 1e-6  # the rows add up to the wall time
    assert set(out["breakdown"]) == {"setup_s", "per_trial_s", "first_trial_s", "per_later_trial_s", "per_epoch_s",
                                     "teardown_s", "training_slowdown_s"}
    assert all(isinstance(out[k], float) for k in ("overhead", "overhead_outside_training", "overhead_vs_train_calls"))
    assert "overhead of `sweeper study run` over the bare script" in result.stderr
    assert set(out["records"]) == {"wall_s", "per_epoch_s", "train_s", "teardown_s", "cpu_s"}
    assert "the trials' models and system metrics, (b) - (c)" in result.stderr
    # The study arm was a real study: its stores and its log are kept with --keep.
    assert (keep / "stores" / "optuna.db").exists() and (keep / "stores" / "mlflow.db").exists()
    assert any(p.name.startswith("bench-study-0-") and p.suffix == ".log" for p in keep.iterdir())
