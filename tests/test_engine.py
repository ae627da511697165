"""The K-worker engine (trainers/engine.py): equivalences between algorithms, backends and resumes.

Small synthetic data (16x16, 4 classes) and LeNet-5-classic keep every run well under a second.
"""
import json
import math

import pytest
import torch

from engine_runs import DEVICE, assert_close, build, config, distributed, one_thread, params, run  # noqa: F401

from trainers.engine import WorkerRunner
from trainers.runner import CentralizedRunner
from trainers.steps import evaluate
from trainers.train import train


# --------------------------------------------------------------------------------------------------
# Equivalences with centralized training


def test_one_worker_local_equals_centralized_exactly():
    # augmentation on: worker 0's generator must draw exactly what the centralized runner's draws
    over = {"data.augment": True, "epochs": 2}
    central = run(config(**over))
    one = run(distributed("local", 1, **over))
    assert isinstance(central, CentralizedRunner) and isinstance(one, WorkerRunner)
    assert torch.equal(params(central), params(one))
    cfg = config(**over)
    assert evaluate(central.eval_model(), central.batcher, cfg, DEVICE) == \
        evaluate(one.eval_model(), one.batcher, cfg, DEVICE)


def test_one_worker_through_train_matches_centralized_history():
    a = train(config(), log=lambda _: None)
    b = train(distributed("local", 1), log=lambda _: None)
    for ra, rb in zip(a.history, b.history):
        assert (ra.train_loss, ra.eval_loss, ra.eval_acc, ra.lr) == (rb.train_loss, rb.eval_loss, rb.eval_acc, rb.lr)


def test_minibatch_equals_centralized_full_batch():
    # B = N/K: each worker's batch is its whole shard, the centralized batch the whole set; the order of
    # examples inside a batch only changes float rounding.
    n, k = 384, 4
    central = run(config(batch_size=n, epochs=4))
    mini = run(distributed("minibatch", k, batch_size=n // k, epochs=4))
    assert_close(central, mini)


def test_minibatch_equals_centralized_at_global_batch_same_order():
    # Several steps per epoch: feed worker k the k-th slice of each centralized batch of K*B examples.
    n, k, b, epochs = 384, 4, 16, 2
    ccfg, mcfg = config(batch_size=k * b, epochs=epochs), distributed("minibatch", k, batch_size=b, epochs=epochs)
    central = run(ccfg)
    mini = build(mcfg)
    generator = torch.Generator(device=DEVICE).manual_seed(ccfg.seed)  # the centralized runner's draws
    perms = [torch.randperm(n, device=DEVICE, generator=generator) for _ in range(epochs)]
    steps = mini.steps_per_epoch
    mini._plan = lambda epoch: [perms[epoch].view(steps, k, b)[:, w].reshape(-1) for w in range(k)]
    run(mcfg, mini)
    assert_close(central, mini)
    # and the workers are replicas of each other
    assert torch.equal(mini.x[0], mini.x[k - 1])


def test_minibatch_with_weight_noise_differs_and_keeps_replicas():
    clean = run(distributed("minibatch", 3))
    noisy = run(distributed("minibatch", 3, **{"distributed.noise_std": 0.01}))
    assert not torch.allclose(params(clean), params(noisy), atol=1e-4)
    assert torch.equal(noisy.x[0], noisy.x[2])  # the noise is only where gradients are taken
    assert torch.isfinite(params(noisy)).all()


# --------------------------------------------------------------------------------------------------
# Equivalences between algorithms


def test_slowmo_identity_equals_local():
    local = run(distributed("local", 4, **{"distributed.local_steps": 2}))
    slow = run(distributed("local", 4, **{"distributed.local_steps": 2,
                                          "distributed.slowmo": {"alpha": 1.0, "beta": 0.0}}))
    assert_close(local, slow, rtol=1e-5, atol=1e-6)
    moving = run(distributed("local", 4, **{"distributed.local_steps": 2,
                                            "distributed.slowmo": {"alpha": 1.0, "beta": 0.5}}))
    assert not torch.allclose(params(local), params(moving), atol=1e-4)


def test_dynamic_local_with_fixed_j_equals_local():
    local = run(distributed("local", 4, **{"distributed.local_steps": 3}))
    dynamic = run(distributed("dynamic-local", 4, **{"distributed.dynamic": {"j_min": 3, "j_max": 3}}))
    assert torch.equal(params(local), params(dynamic))
    state = dynamic.algorithm_state()
    assert set(state["dynamic_J"]) == {3} and len(state["dynamic_J"]) == dynamic.global_step // 3


def test_adaptive_local_with_frozen_period_equals_local():
    local = run(distributed("local", 4, **{"distributed.local_steps": 3}))
    frozen = run(distributed("adaptive-local", 4, **{
        "distributed.adaptive": {"p_init": 3, "warmup_epochs": 0, "sample_fraction": 1.0}}))
    assert torch.equal(params(local), params(frozen))
    assert set(frozen.algorithm_state()["adaptive_period"]) == {3}


def test_adaptive_local_warmup_is_averaging_every_step():
    every = run(distributed("local", 4, **{"distributed.local_steps": 1}))
    warm = run(distributed("adaptive-local", 4, **{"distributed.adaptive": {"warmup_epochs": 2}}))
    assert torch.equal(params(every), params(warm))


def test_decentralized_on_complete_graph_equals_averaging_every_step():
    # K = 3: the ring's neighbourhood {left, self, right} is everyone, W = 1/3 everywhere
    local = run(distributed("local", 3, **{"distributed.local_steps": 1}))
    gossip = run(distributed("decentralized", 3, **{"distributed.topology": "ring"}))
    assert_close(local, gossip, rtol=1e-5, atol=1e-6)
    ring = run(distributed("decentralized", 4, **{"distributed.topology": "ring"}))
    assert not torch.allclose(ring.x[0], ring.x[1])  # a sparse graph leaves the workers apart


def test_post_local_switches_from_minibatch_to_local():
    post = run(distributed("post-local", 4, **{"distributed.switch_epoch": 1, "distributed.local_steps": 3}))
    mini = build(distributed("minibatch", 4))
    mini.train_epoch(0)  # post-local's first epoch is minibatch SGD ...
    local = build(distributed("local", 4, **{"distributed.local_steps": 3}))
    local.load_state_dict(mini.state_dict())  # ... then Local SGD from that state
    local.train_epoch(1)
    assert torch.equal(params(post), params(local))


# --------------------------------------------------------------------------------------------------
# Backends


VMAP_CASES = {
    "minibatch": {},
    "minibatch-noise": {"distributed.algorithm": "minibatch", "distributed.noise_std": 0.01},
    "local": {"distributed.local_steps": 2},
    "local-slowmo-nesterov": {"distributed.algorithm": "local", "distributed.local_steps": 2,
                              "distributed.slowmo": {"alpha": 0.8, "beta": 0.6, "nesterov": True}},
    "local-resnet-bn": {"distributed.algorithm": "local", "distributed.local_steps": 2, "model.name": "resnet",
                        "model.width": 4},
    "local-lars-uneven": {"distributed.algorithm": "local", "optim.name": "lars", "optim.lr": 1.0,
                          "data.synthetic.train_size": 370, "distributed.shards": "reshuffle"},
    "local-lamb-augment": {"distributed.algorithm": "local", "optim.name": "lamb", "optim.lr": 0.01,
                           "data.augment": True},
    "post-local": {"distributed.switch_epoch": 1, "distributed.local_steps": 2},
    "dynamic-local": {"distributed.dynamic": {"alpha": 20.0, "j_min": 1, "j_max": 8}},
    "adaptive-local": {"distributed.adaptive": {"warmup_epochs": 0.25, "p_init": 2, "sample_fraction": 0.5}},
    "decentralized-ring": {"distributed.algorithm": "decentralized", "distributed.topology": "ring"},
    "decentralized-random": {"distributed.algorithm": "decentralized", "distributed.topology": "random"},
    "decentralized-exponential": {"distributed.algorithm": "decentralized", "distributed.topology": "exponential"},
    "diloco": {"distributed.local_steps": 3, "optim.name": "adamw", "optim.lr": 0.003},
}


@pytest.mark.parametrize("case", list(VMAP_CASES))
def test_vmap_equals_serial(case):
    over = dict(VMAP_CASES[case])
    algorithm = over.pop("distributed.algorithm", case)
    serial = run(distributed(algorithm, 4, **over))
    vmapped = run(distributed(algorithm, 4, **{**over, "distributed.backend": "vmap"}))
    assert_close(serial, vmapped, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(serial.x, vmapped.x, rtol=1e-4, atol=1e-5)  # every worker, not just the mean
    s, v = serial.algorithm_state(), vmapped.algorithm_state()
    for key in ("dynamic_J", "adaptive_period"):
        assert s.get(key) == v.get(key)


# --------------------------------------------------------------------------------------------------
# The runner protocol: evaluation model, reports, checkpoints


def test_eval_model_is_the_average_outside_the_workers():
    runner = run(distributed("local", 4, **{"distributed.local_steps": 5}, epochs=1))  # 6 steps: unsynced
    workers = runner.x.clone()
    assert not torch.allclose(workers[0], workers[1])
    model = runner.eval_model()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(flat, workers.mean(0))
    assert torch.equal(runner.x, workers)  # workers untouched
    assert all(p.data_ptr() != runner.x.data_ptr() for p in model.parameters())


def test_batchnorm_statistics_are_averaged_with_the_parameters():
    # 8 local steps per epoch, J = 4: the run ends on an averaging
    cfg = distributed("local", 3, **{"distributed.local_steps": 4, "model.name": "resnet", "model.width": 4})
    runner = run(cfg)
    assert runner.b.shape[1] > 0 and not torch.allclose(runner.b[0], build(cfg).b[0])  # statistics moved
    assert torch.equal(runner.b[0], runner.b[2]) and torch.equal(runner.x[0], runner.x[2])


def test_outer_steps_use_the_lr_of_the_last_local_step(monkeypatch):
    from trainers import algorithms
    from trainers.schedules import lr_factor

    seen = []
    real = algorithms.slowmo_
    monkeypatch.setattr(algorithms, "slowmo_", lambda *a, **kw: (seen.append(a[3]), real(*a, **kw)))
    cfg = distributed("local", 2, **{"distributed.local_steps": 2, "distributed.slowmo": {"alpha": 1.0, "beta": 0.5},
                                     "schedule.warmup_epochs": 1.0})
    runner = run(cfg)
    lr = lambda step: 0.05 * lr_factor(step, runner.steps_per_epoch, cfg.epochs, cfg.schedule)
    steps = range(1, cfg.epochs * runner.steps_per_epoch, 2)  # averagings after steps 1, 3, 5, ... (0-based)
    assert seen == pytest.approx([lr(t) for t in steps], rel=1e-12)
    cfg = distributed("adaptive-local", 2, **{"distributed.adaptive": {"warmup_epochs": 0.5},
                                              "schedule.warmup_epochs": 1.0})
    state = run(cfg).algorithm_state()
    assert state["adaptive_lr"] == pytest.approx([lr(t) for t in state["adaptive_step"]], rel=1e-12)


def test_shards_cover_the_data_and_reshuffle_changes_them():
    runner = build(distributed("local", 3, **{"distributed.shards": "reshuffle"}))
    first, second = runner._plan(0), runner._plan(1)
    for plan in (first, second):
        assert torch.equal(torch.cat(plan).sort().values, torch.arange(runner.n))
    assert set(first[0].tolist()) != set(second[0].tolist())
    fixed = build(distributed("local", 3))
    assert set(fixed._plan(0)[0].tolist()) == set(fixed._plan(1)[0].tolist()) == set(range(128))


def test_reports_timing_and_communication():
    k, j = 4, 2
    result = train(distributed("local", k, **{"distributed.local_steps": j, "distributed.network.preset": "100gib"}),
                   log=lambda _: None)
    assert result.status == "completed"
    steps = math.ceil(384 / (k * 16))  # 6 local steps per epoch
    param_bytes = sum(p.numel() for p in build(config()).model.parameters()) * 4
    for report in result.history:
        e = report.extra
        assert e["comm_rounds"] == steps // j
        assert e["comm_bytes"] == pytest.approx(e["comm_rounds"] * 2 * (k - 1) / k * param_bytes)
        assert e["comm_time_modeled"] == pytest.approx(e["comm_rounds"] * 2e-6 + e["comm_bytes"] / 12.5e9)
        assert e["wall_time_modeled"] == pytest.approx(e["compute_time_parallel"] + e["comm_time_modeled"])
        assert 0 < e["compute_time_parallel"] <= e["compute_time"] <= report.epoch_time
        assert 0 < e["comm_time_measured"] < report.epoch_time
        assert e["local_steps_mean"] == j
        assert report.images_per_sec > 0
    for key in ("compute_time", "comm_rounds", "comm_bytes", "comm_time_modeled", "wall_time_modeled"):
        assert result.totals[key] == pytest.approx(sum(r.extra[key] for r in result.history))
    json.dumps(result.to_dict())  # everything, algorithm state included, is JSON


def test_dynamic_and_adaptive_state_is_recorded():
    dyn = train(distributed("dynamic-local", 4, **{"distributed.dynamic": {"alpha": 20.0, "j_min": 1, "j_max": 8}}),
                log=lambda _: None)
    s = dyn.state
    assert len(s["dynamic_J"]) == len(s["dynamic_G"]) == len(s["dynamic_sigma2"]) == dyn.totals["comm_rounds"]
    assert all(1 <= j <= 8 for j in s["dynamic_J"]) and all(v >= 0 for v in s["dynamic_sigma2"])
    assert len(set(s["dynamic_J"])) > 1  # the rule moves J
    # the first period is J_min; each later one lasts the J chosen at the averaging before it
    periods = [b - a for a, b in zip([-1] + s["dynamic_step"], s["dynamic_step"])]
    assert periods == [1] + s["dynamic_J"][:-1]
    ada = train(distributed("adaptive-local", 4, **{"distributed.adaptive": {"warmup_epochs": 0.5,
                                                                              "sample_fraction": 0.75}}),
                log=lambda _: None)
    s = ada.state
    assert len(s["adaptive_S"]) == len(s["adaptive_period"]) == ada.totals["comm_rounds"]
    assert s["adaptive_period"][:3] == [1, 1, 1]  # warm-up: 3 of the 6 steps of epoch 1
    assert s["adaptive_C2"] > 0
    json.dumps(s)


class Interrupt(Exception):
    pass


RESUME_CASES = {
    "dynamic-slowmo-serial": {"distributed.algorithm": "dynamic-local",
                              "distributed.dynamic": {"alpha": 20.0, "j_min": 1, "j_max": 5},
                              "distributed.slowmo": {"alpha": 1.0, "beta": 0.5}, "distributed.shards": "reshuffle",
                              "data.augment": True, "epochs": 3},
    "adaptive-vmap": {"distributed.algorithm": "adaptive-local", "distributed.backend": "vmap",
                      "distributed.adaptive": {"warmup_epochs": 0.5, "sample_fraction": 0.4}, "epochs": 3},
    "local-slowmo-midperiod": {"distributed.algorithm": "local", "distributed.local_steps": 3,  # 8 steps/epoch
                               "distributed.slowmo": {"alpha": 0.9, "beta": 0.7, "nesterov": True}, "epochs": 3},
    "decentralized-random-noise-free": {"distributed.algorithm": "decentralized", "distributed.topology": "random",
                                        "data.augment": True, "epochs": 3},
    "diloco-midround": {"distributed.algorithm": "diloco", "distributed.local_steps": 3, "optim.name": "adamw",
                        "optim.lr": 0.003, "epochs": 3},
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resumed_run_equals_uninterrupted(case, tmp_path):
    cfg = config(**{"distributed.workers": 3, **RESUME_CASES[case]})
    straight = train(cfg, checkpoint_dir=tmp_path / "a", log=lambda _: None)

    def stop_after_first(report):
        if report.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, on_epoch=stop_after_first, checkpoint_dir=tmp_path / "b", log=lambda _: None)
    resumed = train(cfg, checkpoint_dir=tmp_path / "b", log=lambda _: None)

    key = lambda r: (r.train_loss, r.train_acc, r.eval_loss, r.eval_acc, r.lr)
    assert [key(r) for r in straight.history] == [key(r) for r in resumed.history]
    assert straight.state == resumed.state
    assert straight.totals["comm_rounds"] == resumed.totals["comm_rounds"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["runner"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["runner"]
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["b"], b["b"])


@pytest.mark.parametrize("algorithm", ["minibatch", "local", "dynamic-local", "adaptive-local", "decentralized", "diloco"])
def test_an_epoch_reports_exactly_the_declared_metrics(algorithm):
    """What `trainers.results.METRICS` declares (spec validation, run totals and report labels read it) is
    what an epoch of each algorithm reports, and what a centralized epoch reports is the epoch scope."""
    from trainers.results import CONTROLLED, METRICS

    over = {"distributed.dynamic": {"j_min": 2, "j_max": 4}} if algorithm == "dynamic-local" else {}
    report = train(distributed(algorithm, 2, epochs=1, **over), log=lambda _: None).history[0]
    scopes = {"epoch", "engine"} | ({"controller"} if algorithm in CONTROLLED else set())
    assert set(report.metrics()) == {m.name for m in METRICS if m.scope in scopes}
    central = train(config(epochs=1), log=lambda _: None).history[0]
    assert set(central.metrics()) == {m.name for m in METRICS if m.scope == "epoch"}


def test_vmap_runs_a_model_with_a_random_op_in_its_forward():
    cfg = distributed("local", 2, **{"model.name": "engine_runs:dropout_net", "distributed.backend": "vmap",
                                     "distributed.local_steps": 100, "epochs": 1})
    runner = run(cfg)
    assert torch.isfinite(runner.x).all() and not torch.equal(runner.x[0], runner.x[1])
