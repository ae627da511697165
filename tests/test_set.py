"""`--set KEY=VALUE` and `--name` on `study run`, `study resume` and `sweeper worker`: the key rule (the
first part is the spec's top-level key; under grid/search the rest is the dimension's dotted key), YAML
values, errors that name the item (exit 2, nothing created), and the overrides stored with the study."""
from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from conftest import TINY_BASE, write_spec

from sweeper.cli import main
from sweeper.spec import SpecError, StudySpec, apply_overrides, load_spec_with, with_overrides
from sweeper.study.progress import names, snapshot

RAW = {"name": "s", "kind": "grid", "base": TINY_BASE, "grid": {"optim.lr": [0.05, 0.1]}}


def test_the_key_rule_and_yaml_values():
    spec = with_overrides(RAW, ["grid.optim.lr=[0.01, 0.1, 1.0]", "grid.batch_size=[16,32]", "base.epochs=3",
                                "base.optim={name: adamw, lr: 0.001}", "seeds=[0,1]", "heartbeat.grace=60",
                                "objective.metric=eval_loss", "objective.direction=minimize"], "s.yaml")
    assert spec.grid == {"optim.lr": [0.01, 0.1, 1.0], "batch_size": [16, 32]}  # 'optim.lr' is one key
    assert spec.base["epochs"] == 3 and spec.base["optim"] == {"name": "adamw", "lr": 0.001}  # merged
    assert spec.base["data"] == TINY_BASE["data"] and spec.seeds == [0, 1] and spec.heartbeat.grace == 60
    assert (spec.objective.metric, spec.objective.direction) == ("eval_loss", "minimize")
    assert len(spec.points()) == 12 and spec.overrides[0] == "grid.optim.lr=[0.01, 0.1, 1.0]"
    assert RAW["grid"] == {"optim.lr": [0.05, 0.1]} and "overrides" not in RAW  # the input is not changed
    stored = spec.to_dict()  # what the study stores: the spec after --set, and the items
    assert stored["grid"]["optim.lr"] == [0.01, 0.1, 1.0] and stored["overrides"] == spec.overrides
    again = with_overrides(stored, ["budget=null"], "study s (stored spec)")
    assert again.overrides == [*spec.overrides, "budget=null"]
    assert StudySpec.from_dict(again.to_dict()).overrides == again.overrides
    renamed = with_overrides(RAW, [], "s.yaml", name="t")
    assert renamed.name == "t" and renamed.overrides == []
    tune = with_overrides({**RAW, "kind": "tune", "grid": None, "budget": 4,
                           "search": {"optim.lr": {"low": 0.01, "high": 0.1}}},
                          ["search.optim.lr={low: 0.001, high: 0.5, log: true}"], "t.yaml")
    assert tune.search["optim.lr"].low == 0.001 and tune.search["optim.lr"].log


@pytest.mark.parametrize("items, message", [
    (["base.epochs=0"], "--set base.epochs=0: s.yaml: base.epochs: must be positive"),
    (["base.optim.name=lamd"], "--set base.optim.name=lamd: s.yaml: base.optim.name: unknown value 'lamd'"),
    (["grid.optim.lr=[]"], "--set grid.optim.lr=[]: s.yaml: grid.optim.lr: expected a non-empty list"),
    (["grid.optim.lr=[0.1, -1]"], "--set grid.optim.lr=[0.1, -1]: s.yaml: grid.optim.lr[1] = -1"),
    (["seeds=[0,0]"], "--set seeds=[0,0]: s.yaml: seeds: lists a seed twice"),
    (["bse.epochs=2"], "--set bse.epochs=2: bse: not a key of a spec"),
    (["base.epochs.x=1"], "--set base.epochs.x=1: base.epochs: is a value, cannot set base.epochs.x"),
    (["base.epochs=2", "kind=tune"], "(with --set base.epochs=2 --set kind=tune)"),
    (["noequals"], "override 'noequals': expected KEY=VALUE"),  # sweeper train --set's own messages
    (["grid.optim.lr=[0.1"], "override 'grid.optim.lr=[0.1': grid.optim.lr: not valid YAML"),
])
def test_errors_name_the_item_and_the_reason(items, message):
    with pytest.raises(Exception) as err:
        with_overrides(RAW, items, "s.yaml")
    assert message in str(err.value), str(err.value)
    from trainers.config import ConfigError

    assert isinstance(err.value, ConfigError)  # the command line's `error:` line, exit 2


def test_a_spec_file_with_set(tmp_path):
    path = write_spec(tmp_path / "s.yaml", "s")
    spec = load_spec_with(str(path), ["grid.optim.lr=[0.2]"], name="s2")
    assert (spec.name, spec.grid, spec.overrides) == ("s2", {"optim.lr": [0.2]}, ["grid.optim.lr=[0.2]"])
    assert apply_overrides(yaml.safe_load(path.read_text()), [])["grid"] == {"optim.lr": [0.05, 0.1]}
    with pytest.raises(SpecError, match="overrides: expected a list"):
        StudySpec.from_dict({**RAW, "overrides": "base.epochs=2"})


@pytest.mark.slow
def test_set_on_run_resume_and_worker(workdir, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    cli = CliRunner()
    path = str(write_spec(workdir / "s.yaml", "s"))
    result = cli.invoke(main, ["study", "run", path, "--set", "base.epochs=0", "--n-trials", "0"])
    assert result.exit_code == 2, result.output
    assert "error: --set base.epochs=0: " in result.output and "must be positive" in result.output
    assert "s" not in names()  # nothing created
    result = cli.invoke(main, ["study", "run", path, "--set", "grid.optim.lr=[0.05, 0.1, 0.2]", "--set", "seeds=[0,1]",
                               "--set", "base.epochs=1", "--n-trials", "0"])
    assert result.exit_code == 0, result.output
    assert "study s (grid, 6 grid points" in result.output
    _, spec = snapshot("s")
    assert spec.grid == {"optim.lr": [0.05, 0.1, 0.2]} and spec.seeds == [0, 1] and spec.base["epochs"] == 1
    assert spec.overrides == ["grid.optim.lr=[0.05, 0.1, 0.2]", "seeds=[0,1]", "base.epochs=1"]
    status = cli.invoke(main, ["study", "status", "s"]).output
    assert "set: --set grid.optim.lr=[0.05, 0.1, 0.2] --set seeds=[0,1] --set base.epochs=1" in status
    # The same spec file without the --set items is another spec: the usual error, nothing changed.
    result = cli.invoke(main, ["study", "run", path, "--n-trials", "0"])
    assert result.exit_code == 2 and "already exists with a different spec" in result.output
    # resume: what does not decide the trials may change; what does needs --name.
    result = cli.invoke(main, ["study", "resume", "s", "--set", "base.epochs=2", "--n-trials", "0"])
    assert result.exit_code == 2, result.output
    assert "already exists with a different spec (differs in: base.epochs)" in result.output
    result = cli.invoke(main, ["study", "resume", "s", "--set", "heartbeat.grace=45", "--n-trials", "0"])
    assert result.exit_code == 0, result.output
    _, spec = snapshot("s")
    assert spec.heartbeat.grace == 45 and spec.overrides[-1] == "heartbeat.grace=45" and len(spec.overrides) == 4
    result = cli.invoke(main, ["study", "resume", "s", "--set", "base.epochs=2", "--name", "s-2ep", "--n-trials", "0"])
    assert result.exit_code == 0, result.output
    assert sorted(names()) == ["s", "s-2ep"]
    _, spec = snapshot("s-2ep")
    assert spec.base["epochs"] == 2 and spec.grid == {"optim.lr": [0.05, 0.1, 0.2]}
    result = cli.invoke(main, ["worker", "s-2ep", "--set", "grid.optim.lr=[0.3]", "--n-trials", "0"])
    assert result.exit_code == 2, result.output
    assert "differs in: grid.optim.lr" in result.output
    result = cli.invoke(main, ["worker", "s-2ep", "--set", "grid.optim.lr=[0.3]", "--name", "s-one", "-q"])
    assert result.exit_code == 0, result.output
    assert "study s-one: 2/2 done" in result.output  # 1 lr x 2 seeds, trained
    assert sorted(names()) == ["s", "s-2ep", "s-one"]


@pytest.mark.slow
def test_two_workers_tell_one_story(workdir, mlflow_server):
    """`study run --set ... --workers 2` on a 4-point grid: the workers print their trials; the parent
    prints the one summary (and the report), the workers no header, summary or resume command."""
    import re
    import subprocess

    from conftest import subprocess_env, sweeper_cmd

    path = write_spec(workdir / "w.yaml", "w")
    proc = subprocess.run(sweeper_cmd("study", "run", str(path), "--set", "seeds=[0,1]", "--workers", "2", "--quiet",
                                      "--tracking-uri", mlflow_server.uri),
                          cwd=workdir, env=subprocess_env(workdir), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    lines = out.splitlines()
    assert len([line for line in lines if re.match(r"study w: \d+/\d+ done", line)]) == 1, out
    assert "study w: 4/4 done; best eval_acc" in out and lines[0].startswith("study w (grid, 4 grid points")
    assert sum(line.startswith("study w (grid") for line in lines) == 1  # the header once, by the parent
    assert sum(" COMPLETE eval_acc " in line and line.startswith(("[w1] trial", "[w2] trial")) for line in lines) == 4
    assert len([line for line in lines if line.startswith("MLflow: experiment 'w'")]) == 1
    assert "report: mlruns/reports/w/report.md" in out
    assert sorted(re.findall(r"\[(w\d)\] worker done: (\d) trial", out)) in ([("w1", "2"), ("w2", "2")],
                                                                             [("w1", "1"), ("w2", "3")],
                                                                             [("w1", "3"), ("w2", "1")],
                                                                             [("w1", "4"), ("w2", "0")],
                                                                             [("w1", "0"), ("w2", "4")])
    assert "resume" not in out and "orchestration" not in out
    _, spec = snapshot("w")
    assert spec.overrides == ["seeds=[0,1]"]
