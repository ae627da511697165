"""The Python API: README's example runs as written; `import sweeper` stays cheap."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env, write_spec


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Python API\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_importing_sweeper_imports_nothing_heavy(workdir):
    script = ("import sys, sweeper\n"
              "assert callable(sweeper.run_study) and callable(sweeper.build_report)\n"
              "print(sorted(m for m in ('torch', 'mlflow', 'optuna', 'pandas', 'sqlalchemy', 'numpy') "
              "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=workdir, timeout=60,
                         env=subprocess_env(workdir))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_readme_example_runs_as_written(workdir, mlflow_server, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    code = readme_example()
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    result, frame, curves, path = (namespace[k] for k in ("result", "frame", "curves", "path"))
    assert result.complete and (result.done, result.total, result.ran, result.failed) == (4, 4, 4, 0)
    assert result.name == "api-demo" and result.best_params and "optim.lr" in result.best_params
    assert result.parent_run_id and result.tracking_uri == mlflow_server.uri
    assert len(frame) == 4 and set(frame["state"]) == {"COMPLETE"} and sorted(frame["seed"]) == [0, 0, 1, 1]
    assert list(frame["trial"]) == [0, 1, 2, 3] and frame["final_eval_acc"].notna().all()
    assert list(curves.columns) == ["trial", "epoch", "metric", "value"]
    acc = curves[curves.metric == "eval_acc"]
    assert len(acc) == 4 * 2 and sorted(set(acc["epoch"])) == [1, 2]  # base.epochs=2 from set=
    assert path.name == "report.md" and path.exists() and "api-demo" in path.read_text()
    printed = capsys.readouterr().out
    assert "True 4 4" in printed  # quiet: only the example's own prints
    assert "COMPLETE eval_acc" not in printed and "study api-demo" not in printed
    import sweeper

    assert result.trials().equals(sweeper.trials("api-demo"))
    stored = sweeper.trials("api-demo")
    from sweeper.study.progress import snapshot

    _, spec = snapshot("api-demo")
    assert spec.overrides == ["base.epochs=2", "seeds=[0,1]"] and spec.base["epochs"] == 2
    again = sweeper.run_study(namespace["spec"], set=["base.epochs=2", "seeds=[0,1]"])
    assert again.ran == 0 and again.complete and len(stored) == 4


@pytest.mark.slow
def test_run_study_from_a_path_with_n_trials_and_trials_in_every_state(workdir, mlflow_server, monkeypatch):
    import sweeper
    from sweeper.spec import SpecError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    path = write_spec(workdir / "p.yaml", "p", grid={"optim.lr": [0.05, 0.1, 0.2]})
    with pytest.raises(SpecError, match=r"--set base\.epochs=0: .*base\.epochs: must be positive"):
        sweeper.run_study(path, set=["base.epochs=0"])
    from sweeper.study.progress import names

    assert "p" not in names()  # nothing created
    result = sweeper.run_study(str(path), n_trials=1, name="p1")
    assert (result.name, result.ran, result.done, result.total, result.complete) == ("p1", 1, 1, 3, False)
    frame = sweeper.trials("p1")
    assert list(frame["state"]) == ["COMPLETE", "WAITING", "WAITING"] and frame["optim.lr"].tolist()[0] == 0.05
    assert frame["value"].notna().tolist() == [True, False, False]
    assert set(sweeper.curves("p1")["trial"]) == {0}
    out = sweeper.build_report("p1", out=workdir / "r", fmt="csv")
    assert out == workdir / "r" and (out / "trials.csv").exists()
