"""DiLoCo (Douillard et al. 2023) in the K-worker engine: its outer step is SGD with Nesterov momentum on
the pseudo-gradient at its own lr, whatever the inner schedule; outer lr 1 without momentum is Local SGD;
SlowMo's Nesterov step (scaled by the inner lr) equals it only at a constant inner lr."""
from __future__ import annotations

import pytest
import torch
from engine_runs import assert_close, build, distributed, one_thread, params, run  # noqa: F401

from trainers.config import ConfigError, TrainConfig

H = 3  # inner steps per round (8 local steps per epoch at K=4, B=16, N=384: rounds end mid-epoch too)
INNER = {"optim.name": "adamw", "optim.lr": 0.003, "optim.weight_decay": 0.01}


def diloco(**over) -> TrainConfig:
    return distributed("diloco", 4, **{**INNER, "distributed.local_steps": H, **over})


class ReferenceOuter:
    """The outer optimizer written out: torch.optim.SGD(nesterov=True)'s update on the outer gradient
        g = anchor - mean;   u <- mu u + g;   anchor <- anchor - lr (g + mu u)."""

    def __init__(self, x0: torch.Tensor, lr: float, mu: float):
        self.anchor, self.u, self.lr, self.mu = x0.clone(), torch.zeros_like(x0), lr, mu
        self.first = True

    def step(self, mean, inner_lr):
        g = self.anchor - mean
        self.u = g.clone() if self.first else self.mu * self.u + g  # torch's buffer starts at the first g
        self.first = False
        self.anchor -= self.lr * (g + self.mu * self.u)
        return self.anchor


def test_diloco_is_nesterov_sgd_on_the_pseudo_gradient_under_a_cosine_inner_schedule():
    cfg = diloco(**{"schedule.name": "cosine", "schedule.warmup_epochs": 0.5})
    engine = run(cfg)
    reference = build(distributed("local", 4, **{**INNER, "distributed.local_steps": H,
                                                 "schedule.name": "cosine", "schedule.warmup_epochs": 0.5}))
    reference.algorithm.outer = ReferenceOuter(reference.x[0], lr=0.7, mu=0.9)
    run(cfg, reference)
    assert_close(engine, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(engine.x, reference.x, rtol=1e-5, atol=1e-6)
    plain = run(distributed("local", 4, **{**INNER, "distributed.local_steps": H}))
    assert not torch.allclose(params(engine), params(plain), atol=1e-4)  # the outer step does something


def test_outer_lr_one_without_momentum_is_local_sgd():
    local = run(distributed("local", 4, **{**INNER, "distributed.local_steps": H}))
    identity = run(diloco(**{"distributed.diloco": {"outer_lr": 1.0, "outer_momentum": 0.0}}))
    assert_close(local, identity, rtol=1e-5, atol=1e-6)


def test_slowmo_nesterov_equals_diloco_only_at_a_constant_inner_lr():
    """SlowMo scales its step by the inner lr gamma (Wang et al. 2020, Alg. 1): at a constant gamma its
    Nesterov form is DiLoCo's outer step; under a cosine schedule it is not."""
    slowmo = {"distributed.algorithm": "local", "distributed.slowmo": {"alpha": 0.7, "beta": 0.9, "nesterov": True}}
    constant = {"schedule.name": "constant"}
    assert_close(run(diloco(**constant)), run(diloco(**constant, **slowmo)), rtol=1e-4, atol=1e-5)
    cosine = {"schedule.name": "cosine"}
    assert not torch.allclose(params(run(diloco(**cosine))), params(run(diloco(**cosine, **slowmo))), atol=1e-4)


def test_diloco_config_is_validated():
    with pytest.raises(ConfigError, match="distributed.diloco.outer_momentum: must lie in"):
        diloco(**{"distributed.diloco": {"outer_momentum": 1.0}})
    with pytest.raises(ConfigError, match="distributed.slowmo: needs an averaging algorithm"):
        diloco(**{"distributed.slowmo": {"alpha": 1.0}})
