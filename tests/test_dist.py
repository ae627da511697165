"""The dist backend (trainers/launch.py, comm.ProcessGroup): real torch.distributed processes on gloo.

Equivalence with the serial backend is the contract: the same algorithm, seeds and data give the same
trajectory whether the K workers are rows of one tensor or K processes exchanging tensors through
collectives. One process group per world size runs every case (spawning processes is the slow part).
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from trainers.config import ConfigError, TrainConfig
from trainers.checkpoints import checkpoint_history
from trainers.train import train

pytestmark = pytest.mark.slow  # every test here spawns torch.distributed processes
CASES = {
    "local": {"distributed.algorithm": "local", "distributed.local_steps": 2},
    "local-slowmo": {"distributed.algorithm": "local", "distributed.local_steps": 2,
                     "distributed.slowmo": {"alpha": 0.8, "beta": 0.6}},
    "local-slowmo-nesterov-bn": {"distributed.algorithm": "local", "distributed.local_steps": 3,
                                 "distributed.slowmo": {"alpha": 1.2, "beta": 0.5, "nesterov": True},
                                 "model.name": "resnet", "model.width": 4},
    "decentralized-ring": {"distributed.algorithm": "decentralized", "distributed.topology": "ring"},
    "minibatch": {"distributed.algorithm": "minibatch"},
    "minibatch-noise": {"distributed.algorithm": "minibatch", "distributed.noise_std": 0.01},
    "post-local": {"distributed.algorithm": "post-local", "distributed.switch_epoch": 1,
                   "distributed.local_steps": 2},
    "dynamic-local": {"distributed.algorithm": "dynamic-local",
                      "distributed.dynamic": {"alpha": 20.0, "j_min": 1, "j_max": 8}},
    "adaptive-local": {"distributed.algorithm": "adaptive-local",
                       "distributed.adaptive": {"warmup_epochs": 0.25, "p_init": 2, "sample_fraction": 0.5}},
    "local-lamb-augment-uneven": {"distributed.algorithm": "local", "optim.name": "lamb", "optim.lr": 0.01,
                                  "data.augment": True, "data.synthetic.train_size": 370,
                                  "distributed.shards": "reshuffle"},
}
CASES["diloco"] = {"distributed.algorithm": "diloco", "distributed.local_steps": 3, "optim.name": "adamw",
                   "optim.lr": 0.003}
CASES_K3 = {
    "decentralized-ring": {"distributed.algorithm": "decentralized", "distributed.topology": "ring"},
    "decentralized-random": {"distributed.algorithm": "decentralized", "distributed.topology": "random"},
    "decentralized-exponential": {"distributed.algorithm": "decentralized", "distributed.topology": "exponential"},
    "local": {"distributed.algorithm": "local", "distributed.local_steps": 2},
}


def config(workers: int, backend: str, **overrides) -> TrainConfig:
    raw = {"data": {"dataset": "synthetic", "split": "test", "augment": False,
                    "synthetic": {"train_size": 384, "test_size": 128, "image_size": 16, "classes": 4}},
           "model": {"name": "lenet5-classic"}, "optim": {"name": "sgdm", "lr": 0.05},
           "schedule": {"name": "cosine"}, "batch_size": 16, "epochs": 2, "device": "cpu", "threads": 1}
    return TrainConfig.from_dict(raw, {"distributed.workers": workers, "distributed.backend": backend, **overrides})


def figures(result) -> list:
    """Everything a run reports that the backend must not change (times aside)."""
    keep = ("train_loss", "train_acc", "eval_loss", "eval_acc", "lr", "comm_rounds", "comm_bytes",
            "local_steps_mean", "local_steps")
    return [{k: v for k, v in r.metrics().items() if k in keep} for r in result.history]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cases: dict, out: str) -> None:
    """One rank of a test group: joins over loopback, runs every case through train(), rank 0 saves."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    results = {}
    for name, overrides in cases.items():
        result = train(config(world, "dist", **overrides), log=lambda _: None)
        results[name] = (figures(result), result.state, result.status)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def run_group(world: int, cases: dict, tmp_path) -> dict:
    out = str(tmp_path / f"results-{world}.pt")
    mp.start_processes(_rank, args=(world, _free_port(), cases, out), nprocs=world, start_method="spawn")
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def dist_k2(tmp_path_factory):
    return run_group(2, CASES, tmp_path_factory.mktemp("dist2"))


@pytest.fixture(scope="module")
def dist_k3(tmp_path_factory):
    return run_group(3, CASES_K3, tmp_path_factory.mktemp("dist3"))


def serial(world: int, overrides: dict):
    before = torch.get_num_threads()
    try:
        result = train(config(world, "serial", **overrides), log=lambda _: None)
    finally:
        torch.set_num_threads(before)
    return figures(result), result.state, result.status


@pytest.mark.parametrize("case", list(CASES))
def test_dist_k2_equals_serial(dist_k2, case):
    """K=2: the collectives compute the same sums in the same order as the serial backend's tensor ops,
    so every reported figure and the algorithm state are equal bit for bit."""
    got, want = dist_k2[case], serial(2, CASES[case])
    assert got[2] == want[2] == "completed"
    assert got[1] == want[1]  # algorithm state: J_t / ADPSGD trajectories, steps taken
    assert got[0] == want[0]


@pytest.mark.parametrize("case", list(CASES_K3))
def test_dist_k3_gossip_and_averaging_equal_serial(dist_k3, case):
    """K=3: point-to-point gossip with two neighbours, a random matching with one worker sitting out,
    the exponential graph's one-way exchanges; sums may round differently from the matmul, so: close."""
    got, want = dist_k3[case], serial(3, CASES_K3[case])
    assert got[2] == want[2] == "completed"
    for epoch_got, epoch_want in zip(got[0], want[0], strict=True):
        for key in epoch_want:
            assert epoch_got[key] == pytest.approx(epoch_want[key], rel=1e-4, abs=1e-5), (case, key)


class Stop(Exception):
    pass


def test_train_launches_ranks_relays_reports_and_resumes(tmp_path):
    """train() in an ordinary process starts the ranks itself; on_epoch runs here; an exception from it
    (a pruner's) stops the ranks after their checkpoint, and the next call continues from it to the same
    result as an uninterrupted run."""
    overrides = {"distributed.algorithm": "local", "distributed.local_steps": 2, "epochs": 3,
                 "distributed.slowmo": {"alpha": 1.0, "beta": 0.5}}
    cfg = config(2, "dist", **overrides)
    whole = train(cfg, log=lambda _: None)
    assert whole.status == "completed" and whole.epochs_completed == 3
    assert figures(whole) == serial(2, overrides)[0]

    seen, progress = [], []

    def stop_after_first(report):
        seen.append(report.epoch)
        raise Stop

    with pytest.raises(Stop):
        train(cfg, on_epoch=stop_after_first, checkpoint_dir=tmp_path, on_progress=lambda s, t: progress.append(s),
              log=lambda _: None)
    assert seen == [1] and progress and progress[-1] == 12  # 384 / (2 * 16) steps per epoch
    assert [r.epoch for r in checkpoint_history(tmp_path)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.rank0.epoch1.pt", "checkpoint.rank1.epoch1.pt"]

    lines = []
    resumed = train(cfg, on_epoch=lambda r: seen.append(r.epoch), checkpoint_dir=tmp_path, log=lines.append)
    assert seen == [1, 2, 3]
    assert any("resuming" in line for line in lines)
    assert figures(resumed) == figures(whole)  # bit for bit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.rank0.epoch3.pt", "checkpoint.rank1.epoch3.pt"]


def test_rank_errors_reach_the_caller_with_their_type(tmp_path):
    """A rank's ConfigError (here: its checkpoint was written by another config) is raised by train()."""
    train(config(2, "dist", **{"distributed.algorithm": "local", "epochs": 1}), checkpoint_dir=tmp_path,
          log=lambda _: None)
    with pytest.raises(ConfigError, match="different config"):
        train(config(2, "dist", **{"distributed.algorithm": "local", "epochs": 1, "optim.lr": 0.1}),
              checkpoint_dir=tmp_path, log=lambda _: None)


def test_a_rank_that_dies_fails_the_run_after_what_it_sent_is_delivered():
    """A rank that exits without a word fails the run, but only once what the ranks sent before has been
    delivered: a report that arrives after the death was noticed still reaches its callback, and an error
    report behind it wins over the bare exit code."""
    import queue
    from types import SimpleNamespace

    from trainers.launch import relay

    class Feed:  # the relay's queue: None is a poll that timed out
        def __init__(self, *items):
            self.items = list(items)

        def get(self, timeout):
            item = self.items.pop(0) if self.items else None
            if item is None:
                raise queue.Empty
            return item

    ranks = [SimpleNamespace(exitcode=None, join=lambda: None), SimpleNamespace(exitcode=-9, join=lambda: None)]
    epochs, lines = [], []
    late = Feed(None, ("epoch", "report 1"), ("log", "a line"), ("error", (1, None, "Traceback: out of memory")))
    with pytest.raises(RuntimeError, match="rank 1 failed:\nTraceback: out of memory"):
        relay(ranks, late, epochs.append, None, lines.append)
    assert epochs == ["report 1"] and lines == ["a line"]
    with pytest.raises(RuntimeError, match="rank 1 exited with code -9"):
        relay(ranks, Feed(None, ("epoch", "report 2"), None), epochs.append, None, lines.append)
    assert epochs == ["report 1", "report 2"]


def test_dist_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="larger than"):  # checked before any process starts
        train(config(2, "dist", **{"distributed.algorithm": "local", "batch_size": 256}), log=lambda _: None)
    from trainers.engine import make_engine

    with pytest.raises(ConfigError, match="one process per worker"):
        make_engine(config(2, "dist", **{"distributed.algorithm": "local"}), None, torch.device("cpu"))


def test_torchrun_runs_the_cli_and_only_rank_0_reports(tmp_path):
    """Under torchrun every process runs `sweeper train`; train() joins the group from the environment
    (RANK, WORLD_SIZE, MASTER_*), rank 0 alone prints (and would track), and the run equals serial."""
    import json
    import subprocess
    import sys

    import yaml

    overrides = {"distributed.algorithm": "decentralized", "distributed.topology": "ring", "epochs": 1}
    cfg = config(2, "dist", **overrides)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "sweeper", "train", str(path), "--no-track",
                           "--json"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 1 is silent
    history = json.loads(lines[0])["history"]
    want = serial(2, overrides)[0]
    assert [h["eval_loss"] for h in history] == [w["eval_loss"] for w in want]
    assert [h["train_loss"] for h in history] == [w["train_loss"] for w in want]


class FakeGroup:
    """A rank of a process group whose all-reduce of the latest epoch is given (no processes)."""

    spans_processes = True

    def __init__(self, rank: int, others_latest: int):
        self.rank, self.others_latest = rank, others_latest

    def min_int(self, value: int) -> int:
        return min(value, self.others_latest)

    def barrier(self) -> None:
        pass


def test_a_kill_between_the_ranks_saves_resumes_from_the_epoch_all_ranks_hold(tmp_path):
    """Rank 0 wrote epoch 2, rank 1 was killed before it did: both still hold epoch 1 (old files go only
    after the barrier), and the restart, and the history a study backfills, continue from epoch 1."""
    from trainers.results import EpochReport
    from trainers.checkpoints import Checkpoints

    cfg = config(2, "dist", **{"distributed.algorithm": "local"})

    def payload(epochs: int) -> dict:
        history = [vars(EpochReport(epoch=e, train_loss=1.0, train_acc=50.0, eval_loss=1.0, eval_acc=50.0,
                                    lr=0.1, epoch_time=1.0, eval_time=0.1, images_per_sec=1.0))
                   for e in range(1, epochs + 1)]
        return {"config": cfg.to_dict(), "status": "completed", "history": history}

    rank0, rank1 = Checkpoints(tmp_path, FakeGroup(0, 1)), Checkpoints(tmp_path, FakeGroup(1, 2))
    rank0.save(payload(1), 1)
    rank1.save(payload(1), 1)
    rank0.group.barrier = lambda: (_ for _ in ()).throw(KeyboardInterrupt)  # killed at the barrier
    with pytest.raises(KeyboardInterrupt):
        rank0.save(payload(2), 2)
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint.rank0.epoch1.pt", "checkpoint.rank0.epoch2.pt",
                                                    "checkpoint.rank1.epoch1.pt"}
    assert [r.epoch for r in checkpoint_history(tmp_path)] == [1]
    assert len(rank0.load(cfg, torch.device("cpu"))["history"]) == 1
    assert len(rank1.load(cfg, torch.device("cpu"))["history"]) == 1
    rank0.group.barrier = lambda: None
    rank0.save(payload(2), 2)  # the rerun's epoch 2 replaces the stale one; older files go
    assert not (tmp_path / "checkpoint.rank0.epoch1.pt").exists()


def test_a_study_trial_on_the_dist_backend_is_tracked_like_any_other(workdir, mlflow_server, monkeypatch):
    """The same spec keys, the same MLflow records: a grid trial with backend dist runs its ranks from the
    study process, and its child run gets every epoch's metrics, communication figures included."""
    from conftest import TINY_BASE, write_spec
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from sweeper import study as st
    from sweeper.spec import load_spec

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    base = {**TINY_BASE, "threads": 1, "distributed": {"workers": 2, "algorithm": "local", "backend": "dist"}}
    path = write_spec(workdir / "d.yaml", "dist-study", base=base, grid={"distributed.local_steps": [2]})
    out = st.run(load_spec(str(path)), quiet=True, echo=lambda _: None)
    (trial,) = out.study.get_trials(deepcopy=False)
    assert trial.state == TrialState.COMPLETE
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("dist-study")
    (child,) = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    assert child.data.params["distributed.backend"] == "dist"
    for key in ("eval_acc", "comm_rounds", "comm_time_measured"):
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, key)) == [1, 2]
    rounds = [m.value for m in sorted(client.get_metric_history(child.info.run_id, "comm_rounds"),
                                      key=lambda m: m.step)]
    assert rounds == [2.0, 2.0]  # the val split's 256 examples / (2 workers x 32) = 4 steps per epoch, J = 2
