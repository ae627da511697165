"""LR scaling rules, warm-up and schedules, and the LambdaLR checkpoint round trip."""
import io
import math

import pytest
import torch

from trainers.config import ScheduleConfig
from trainers.schedules import build_scheduler, lr_factor, scale_lr


@pytest.mark.parametrize("rule, expected", [("none", 0.1), ("linear", 0.4), ("sqrt", 0.2)])
def test_scale_lr_rules(rule, expected):
    assert scale_lr(0.1, 256, ScheduleConfig(scaling=rule, reference_batch=64)) == pytest.approx(expected)
    assert scale_lr(0.1, 64, ScheduleConfig(scaling=rule, reference_batch=64)) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["cosine", "step", "constant"])
def test_linear_warmup_ramp(name):
    cfg = ScheduleConfig(name=name, warmup_epochs=2, milestones=[5.0])
    factors = [lr_factor(s, 5, 10, cfg) for s in range(11)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0)  # first step after warm-up: the schedule's start


def test_fractional_warmup_rounds_to_steps():
    cfg = ScheduleConfig(name="constant", warmup_epochs=0.07)  # 0.07 * 100 = 7.000000000000001: 7 steps
    assert [lr_factor(s, 100, 1, cfg) for s in range(8)] == pytest.approx([(s + 1) / 7 for s in range(7)] + [1.0])


def test_cosine_from_one_to_zero():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1)
    spe, epochs = 10, 5  # 10 warm-up steps, then 40 cosine steps
    f = [lr_factor(s, spe, epochs, cfg) for s in range(spe * epochs + 1)]
    assert f[10] == 1.0
    assert f[30] == pytest.approx(0.5)  # half-way through the cosine part
    assert f[49] == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert f[49] < 2e-3 and f[50] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(f[10:], f[11:]))


def test_cosine_without_warmup_starts_at_one():
    assert lr_factor(0, 10, 3, ScheduleConfig(name="cosine")) == 1.0


def test_step_milestones():
    cfg = ScheduleConfig(name="step", milestones=[1.5, 4], gamma=0.1)
    f = {s: lr_factor(s, 10, 6, cfg) for s in (0, 14, 15, 39, 40, 59)}
    assert f == pytest.approx({0: 1.0, 14: 1.0, 15: 0.1, 39: 0.1, 40: 0.01, 59: 0.01})


def test_constant():
    assert {lr_factor(s, 7, 3, ScheduleConfig(name="constant")) for s in range(21)} == {1.0}


def test_scheduler_state_dict_round_trip():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=0.5)

    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
        return opt, build_scheduler(opt, cfg, steps_per_epoch=4, epochs=3)

    opt, sched = make()
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])  # the lr iteration i trains with
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2 * lr_factor(i, 4, 3, cfg) for i in range(12)])

    opt, sched = make()
    for _ in range(5):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    opt, sched = make()  # a fresh process: rebuilt from the config, then restored
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    resumed = []
    for _ in range(7):
        resumed.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert resumed == lrs[5:]
