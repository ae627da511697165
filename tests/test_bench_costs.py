"""`sweeper bench --fixed-costs`: the table's logic on fabricated samples, the option's wiring, and one
end-to-end run on the smallest settings (its figures are measured by the command itself; no timing is
asserted here)."""
from __future__ import annotations

import json
import urllib.request

import pytest
from click.testing import CliRunner

from sweeper import bench_costs
from sweeper.bench_costs import ROWS, CostBenchSettings, run_cost_bench, summarize
from sweeper.cli import main


def samples(sweeper: float, bare: float, workers2: float, workers1: float) -> dict:
    """Three repeats per row whose medians are the given figures (the other two repeats on either side)."""
    around = lambda x: [x * 0.9, x, x * 1.5]  # noqa: E731
    out = {row.key: {"sweeper": around(sweeper), "bare": around(bare)} for row in ROWS}
    out["workers"] = {"sweeper": around(workers2), "bare": around(workers1)}
    return out


def test_every_target_met_when_the_medians_are_under_it():
    lines: list[str] = []
    result = summarize(CostBenchSettings(), samples(0.3, 1.2, 6.0, 10.0), lines.append)
    assert [r["met"] for r in result["rows"].values()] == [True] * len(ROWS) and result["all_met"]
    assert result["rows"]["status"]["sweeper"] == pytest.approx(0.3)
    assert result["rows"]["status"]["bare"] == pytest.approx(1.2)
    assert result["rows"]["workers"]["figure"] == pytest.approx(0.6)  # median(2 workers) / median(1 worker)
    assert all(r["repeats"] == 3 for r in result["rows"].values())
    table = "\n".join(lines)
    for row in ROWS:
        assert row.label in table
    assert table.count(" yes ") == len(ROWS) and " no " not in table


def test_targets_not_met_are_marked_no():
    lines: list[str] = []
    result = summarize(CostBenchSettings(), samples(0.7, 0.2, 8.0, 10.0), lines.append)
    met = {key: r["met"] for key, r in result["rows"].items()}
    # 0.7 s is over 0.5 s (status, list, delivery) but within the rerun's 1 s; 0.8 is over 0.65
    assert met == {"status": False, "list": False, "rerun": True, "delivery": False, "workers": False}
    assert not result["all_met"]
    by_label = {line.split("  ")[0]: line for line in lines}
    assert by_label[ROWS[0].label].split()[-2] == "no" and by_label[ROWS[2].label].split()[-2] == "yes"
    assert "<= 0.65" in by_label[ROWS[4].label] and "<= 1 s" in by_label[ROWS[2].label]


def test_the_option_runs_the_fixed_cost_bench_with_the_repeats(monkeypatch):
    seen = {}

    def fake(s, log):
        seen["settings"] = s
        return summarize(s, samples(0.3, 1.2, 6.0, 10.0), log)

    monkeypatch.setattr(bench_costs, "run_cost_bench", fake)
    result = CliRunner().invoke(main, ["bench", "--fixed-costs", "--repeats", "5", "--json"])
    assert result.exit_code == 0, result.output
    assert seen["settings"].repeats == 5
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out["rows"]) == {row.key for row in ROWS} and out["all_met"]
    assert "final delivery to a live MLflow server" in result.stderr  # the table goes to stderr with --json


@pytest.mark.slow
def test_the_whole_bench_runs_every_row_on_the_smallest_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = CostBenchSettings(repeats=1, epochs=1, points=1, worker_points=2, worker_train_size=320,
                          workdir=str(tmp_path / "bench"))
    lines: list[str] = []
    result = run_cost_bench(s, log=lines.append)
    assert set(result["rows"]) == {row.key for row in ROWS}
    for key, r in result["rows"].items():
        assert r["repeats"] == 1 and r["bare"] > 0, key
        if key != "delivery":  # (the study prints its final delivery to 0.1 s: it may read 0.0)
            assert r["sweeper"] > 0 and r["figure"] > 0, key
        assert isinstance(r["met"], bool)
    walls = result["extras"]["delivery_walls"]
    assert walls["sweeper"][0] > 0 and walls["bare"][0] > 0
    assert result["extras"]["training_per_trial"][0] > 0
    assert any(ROWS[3].label in line for line in lines)
    with pytest.raises(OSError):  # the server was stopped at the end
        urllib.request.urlopen(f"{result['mlflow_server']}/health", timeout=2)
