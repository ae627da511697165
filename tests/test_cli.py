import json
import socket

import pytest
from click.testing import CliRunner

from sweeper.cli import main

SYNTHETIC = ["--set", "data.dataset=synthetic", "--set", "data.augment=false",
             "--set", "data.synthetic={train_size: 256, test_size: 64, channels: 1, image_size: 16, classes: 4}",
             "--set", "model.name=lenet5-classic", "--set", "epochs=2", "--set", "batch_size=32"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_json_without_tracking(in_tmp):
    result = CliRunner().invoke(main, ["train", "--no-track", "--json", *SYNTHETIC])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["summary"]["status"] == "completed" and out["summary"]["epochs_completed"] == 2
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    assert out["mlflow_run_id"] is None


def test_train_logs_params_metrics_and_artifacts_to_mlflow(in_tmp):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{in_tmp}/store/mlflow.db"
    config = in_tmp / "run.yaml"
    config.write_text("optim:\n  name: adamw\n  lr: 1.0e-3\n")
    result = CliRunner().invoke(main, ["train", str(config), "--tracking-uri", uri, "--experiment", "cli-test",
                                       "--json", *SYNTHETIC])
    assert result.exit_code == 0, result.output
    run_id = json.loads(result.stdout.strip().splitlines()[-1])["mlflow_run_id"]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.name"] == "adamw" and run.data.params["data.dataset"] == "synthetic"
    history = client.get_metric_history(run_id, "eval_acc")
    assert sorted(m.step for m in history) == [1, 2]
    assert "final/final_eval_acc" in run.data.metrics and run.data.tags["sweeper.status"] == "completed"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "result.json"}
    assert client.get_experiment(run.info.experiment_id).name == "cli-test"


def test_bad_config_is_one_clear_line(in_tmp):
    result = CliRunner().invoke(main, ["train", "--no-track", "--set", "optim.lr=-1"])
    assert result.exit_code == 2
    assert "error: optim.lr: must be positive" in result.output and "Traceback" not in result.output


def test_unknown_optimizer_names_the_choices(in_tmp):
    result = CliRunner().invoke(main, ["train", "--no-track", "--set", "optim.name=adagrad"])
    assert result.exit_code == 2
    assert "optim.name: unknown value 'adagrad'; choose one of sgdm, adamw, lars, lamb" in result.output


def test_dead_tracking_server_fails_before_training(in_tmp):
    uri = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, ["train", "--tracking-uri", uri, *SYNTHETIC])
    assert result.exit_code == 2
    assert f"MLflow tracking store {uri} is unreachable" in result.output
    assert "epoch" not in result.output


def test_batch_larger_than_data(in_tmp):
    result = CliRunner().invoke(main, ["train", "--no-track", *SYNTHETIC, "--set", "batch_size=4096"])
    assert result.exit_code == 2 and "is larger than the" in result.output


def test_bench_json_reports_rows_and_ratio(in_tmp):
    result = CliRunner().invoke(main, ["bench", "--json", "--steps", "4", "--warmup", "2", "--repeats", "1", "--workers", "2",
                                       "--loader-workers", "0", "--model", "lenet5-classic"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    names = [r["name"] for r in out["rows"]]
    assert names[0].startswith("(a)") and sum(n.startswith("(b)") for n in names) == 4
    assert names[5:] == ["K=2 J=4 serial", "K=2 J=4 vmap"]
    assert all(r["ratio_to_centralized"] > 0 for r in out["rows"][5:])
    assert out["speedup_vs_baseline"] > 0 and out["step_gflop"] > 0
    assert set(out["matmul_peak_gflops"]) == {"fp32", "bf16"}


@pytest.mark.slow
def test_reading_specs_and_studies_does_not_import_torch(in_tmp):
    """Validating a spec, listing studies and a study's status need no torch (its import would be most of
    a `sweeper study list`); a study's run imports it after starting its MLflow courier."""
    import subprocess
    import sys
    from pathlib import Path

    studies = Path(__file__).resolve().parents[1] / "studies"
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from sweeper.cli import main\n"
        "from sweeper.spec import load_spec\n"
        f"for path in {sorted(str(p) for p in studies.glob('*.yaml'))!r}:\n"
        "    load_spec(path)\n"
        "for args in (['study', 'list'], ['study', 'status', 'nothing-here']):\n"
        "    CliRunner().invoke(main, args)\n"
        "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=in_tmp, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.slow
def test_piped_output_is_plain_lines_never_wrapped(in_tmp):
    """Into a pipe (nohup, Slurm logs): one line per epoch with every field, no progress frame."""
    import subprocess
    import sys

    from conftest import subprocess_env

    out = subprocess.run([sys.executable, "-m", "sweeper.cli", "train", "--no-track", *SYNTHETIC, "--set",
                          "optim.lr=0.0123456789"], capture_output=True, text=True, cwd=in_tmp, timeout=300,
                         env={**subprocess_env(in_tmp), "COLUMNS": "40"})
    assert out.returncode == 0, out.stderr
    epochs = [line for line in out.stderr.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and all("train loss" in e and "lr " in e and "img/s" in e for e in epochs), out.stderr
    assert epochs[0].endswith(" s") and "img/s  ETA " in epochs[0] and epochs[1].endswith("img/s"), out.stderr
    assert "━" not in out.stderr and "\r" not in out.stderr


@pytest.mark.slow
def test_a_piped_study_says_its_progress_on_every_epoch_and_its_data_once(in_tmp):
    """Into a pipe: each epoch line ends with the study's progress and ETA; the data source, the same
    for every trial, is said once."""
    import subprocess
    import sys

    from conftest import subprocess_env, write_spec

    spec = write_spec(in_tmp / "p.yaml", "p", grid={"optim.lr": [0.05, 0.1, 0.2]})
    out = subprocess.run([sys.executable, "-m", "sweeper.cli", "study", "run", str(spec), "--tracking-uri",
                          f"sqlite:///{in_tmp}/mlruns/mlflow.db"], capture_output=True, text=True, cwd=in_tmp,
                         timeout=300, env=subprocess_env(in_tmp))
    assert out.returncode == 0, out.stdout + out.stderr
    epochs = [line for line in out.stderr.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 6, out.stderr
    for i, line in enumerate(epochs):  # trial i: i of 3 done while it trains, its ETA once it has an epoch
        assert f"(study p: {i // 2}/3 done, ETA " in line and "ETA after" not in line, line
    assert sum(line.startswith("synthetic: 256 train / 64 val") for line in out.stderr.splitlines()) == 1, out.stderr
    assert "database tables" not in out.stdout + out.stderr
