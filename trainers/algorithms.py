"""The update rules of the K-worker algorithms, as pure functions and small state machines.

Worker state is a flat tensor X of shape [K, P]: row k holds worker k's parameters (the engine lays the
model's tensors out in it, so one op averages, mixes or measures all of them). Nothing here knows about
modules, optimizers or time; `engine.py` decides when a rule applies.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# Averaging (Local SGD / CPSGD) and SlowMo


def average_(x: Tensor) -> Tensor:
    """All-reduce average: every row of x [K, P] becomes the row mean, which is returned ([P], a copy)."""
    mean = x.mean(0)
    x.copy_(mean.expand_as(x))
    return mean


def spread(x: Tensor, mean: Tensor, group=None) -> Tensor:
    """S = (1/K) sum_k ||mean - x_k||^2 (Jiang & Agrawal, Alg. 2 line 11), a 0-d tensor: per-worker
    squared norms, then their mean. x holds all K rows, or with a worker `group` (comm.py) the rows of
    this process, summed over the group."""
    squares = torch.linalg.vector_norm(x - mean, dim=1).square()
    if group is None:
        return squares.mean()
    return group.sum(squares) / group.world


def slowmo_(anchor: Tensor, u: Tensor, mean: Tensor, lr: float, alpha: float, beta: float,
            nesterov: bool = False) -> None:
    """SlowMo outer step (Wang et al. 2020, "SlowMo", Algorithm 1 lines 7-8), in place on `anchor`, `u`:

        d = (x_anchor - x_mean) / gamma               the pseudo-gradient of the period, per unit inner lr
        u <- beta * u + d
        x_anchor <- x_anchor - alpha * gamma * u

    gamma is the inner lr (of the period's last local step). alpha=1, beta=0 gives x_anchor = x_mean:
    plain averaging. With `nesterov` the last line is the Nesterov form of the same momentum,
        x_anchor <- x_anchor - alpha * gamma * (d + beta * u)
    which, at constant gamma, is exactly DiLoCo's outer optimizer (Douillard et al. 2023: SGD with
    Nesterov momentum beta and outer lr alpha on the outer gradient x_anchor - x_mean), as torch's
    SGD(nesterov=True) writes it."""
    gamma = max(lr, 1e-12)  # the schedule's lr is positive on every step; guard the 0/0 of an lr of 0
    d = anchor.sub(mean).div_(gamma)
    u.mul_(beta).add_(d)
    step = d.add_(u, alpha=beta) if nesterov else u
    anchor.sub_(step, alpha=alpha * gamma)


# --------------------------------------------------------------------------------------------------
# Decentralized gossip (DPSGD): doubly stochastic mixing matrices


def mix_(x: Tensor, w: Tensor) -> None:
    """x_k <- sum_j W_kj x_j for every worker k (one gossip step), in place on x [K, P]."""
    x.copy_(w.to(dtype=x.dtype, device=x.device) @ x)


def ring_matrix(k: int) -> Tensor:
    """Ring (Lian et al. 2017; Zhang et al. 2021): uniform weights over the closed neighbourhood
    {left, self, right}, i.e. 1/3 each for K >= 3. For K = 2 left and right are the same worker, so
    the neighbourhood has 2 members (1/2 each); K = 1 is the identity."""
    w = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        members = {(i - 1) % k, i, (i + 1) % k}
        for j in members:
            w[i, j] = 1.0 / len(members)
    return w


def exponential_matrix(k: int, step: int) -> Tensor:
    """One-peer exponential graph (Assran et al. 2019, SGP): at gossip step t, worker i averages with the
    worker 2^(t mod m) places ahead, m = number of distances 1, 2, 4, ... below K. W = (I + P)/2 with P a
    cyclic shift: doubly stochastic. Over m steps information from every worker reaches every other."""
    if k == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    hops = (k - 1).bit_length()  # distances 2^0 .. 2^(hops-1), all < K
    shift = 2 ** (step % hops)
    w = torch.eye(k, dtype=torch.float64) / 2
    for i in range(k):
        w[i, (i + shift) % k] += 0.5
    return w


def matching_matrix(k: int, generator: torch.Generator) -> Tensor:
    """Random perfect matching (Zhang et al. 2021, section 4: "a learner randomly picks a neighbor with
    which to exchange weights in each iteration"): W = (I + P)/2 with P a random pairing. With K odd one
    worker, drawn at random too, sits the step out (its row is the identity)."""
    perm = torch.randperm(k, generator=generator).tolist()
    w = torch.eye(k, dtype=torch.float64)
    for a, b in zip(perm[0::2], perm[1::2]):
        w[a, a] = w[b, b] = w[a, b] = w[b, a] = 0.5
    return w


def complete_matrix(k: int) -> Tensor:
    """All-to-all averaging, 1/K everywhere: the gossip step that equals Local SGD with J = 1."""
    return torch.full((k, k), 1.0 / k, dtype=torch.float64)


def neighbours(w: Tensor) -> int:
    """Most peers any worker sends its model to under W (non-zero off-diagonal entries in a column)."""
    off = w.clone()
    off.fill_diagonal_(0)
    return int((off != 0).sum(0).max().item()) if len(w) > 1 else 0


# --------------------------------------------------------------------------------------------------
# Dynamic local steps J_t (Poiatti et al., section 6)


def gradient_stats(grads: Tensor, group=None) -> tuple[float, float]:
    """(G, sigma^2) from the workers' last gradients grads [K, P] (Poiatti et al., section 6, step i):
        g = (1/K) sum_k g_k;   sigma^2 = sum_k ||g_k - g||^2 / (K - 1);   G = ||g||^2 - sigma^2 / K.
    The paper prints G = ||g||^2 - sigma/k; sigma^2/K here makes G an unbiased
    estimate of ||E g||^2 (E||g||^2 = ||E g||^2 + sigma^2/K). Norms are per worker, then summed. With a
    worker `group` (comm.py) grads holds this process's rows and the mean and sum run over the group."""
    k = grads.shape[0] if group is None else group.world
    if k < 2:
        raise ValueError("gradient statistics need at least 2 workers")
    g = grads.mean(0) if group is None else group.mean(grads)
    squares = torch.linalg.vector_norm(grads - g, dim=1).square()
    sigma2 = (squares.sum() if group is None else group.sum(squares)) / (k - 1)
    big_g = torch.linalg.vector_norm(g).square() - sigma2 / k
    return float(big_g), float(sigma2)


def dynamic_steps(big_g: float, sigma2: float, alpha: float, eps: float, j_min: int, j_max: int) -> int:
    """J_t = int(min(J_max, max(J_min, alpha * G / (sigma^2 + eps)))) (Poiatti et al., section 6).
    A negative G (noise dominates) gives J_min; a NaN (a diverging run) gives J_min too."""
    value = alpha * big_g / (sigma2 + eps)
    if math.isnan(value):
        return j_min
    return int(min(j_max, max(j_min, value)))


# --------------------------------------------------------------------------------------------------
# ADPSGD adaptive averaging period (Jiang & Agrawal, Alg. 2)


@dataclass
class PeriodController:
    """The averaging period p of ADPSGD (Jiang & Agrawal, Algorithm 2 and section IV-A).

    - warm-up (the paper's first epoch, `warmup_steps` here): p = 1, nothing is sampled;
    - then p = p_init, and at each averaging after global step k (0-based, the step just taken, with lr
      gamma_k, the lr that step used) with spread S_k:
        k < K_s:  C2 = running mean of S_k / gamma_k           (lines 13-14; p stays p_init)
        else:     S_k < low * gamma_k * C2  -> p += 1          (lines 16-17)
                  S_k > high * gamma_k * C2 -> p = max(1, p-1) (lines 18-19)
    K_s counts from the first step of training, as in the paper (K_s = 0.25 K of all K iterations, with
    the warm-up epoch inside it); only averagings after the warm-up are sampled, since the warm-up runs at
    period 1, not at the p_init whose spread C2 should describe. If the warm-up covers all of [0, K_s)
    no sample exists and the period stays p_init (the rule would compare against C2 = 0)."""

    p_init: int
    warmup_steps: int
    sample_steps: int  # K_s
    low: float = 0.7
    high: float = 1.3
    p: int = 0  # 0: not set yet (p_init after the warm-up)
    c2: float = 0.0
    samples: int = 0

    def period(self, step: int) -> int:
        """The period in force for the local step with 0-based global index `step`."""
        if step < self.warmup_steps:
            return 1
        return self.p or self.p_init

    def update(self, step: int, spread: float, lr: float) -> int:
        """Feed the averaging that followed global step `step`; returns the period for the next ones."""
        if step < self.warmup_steps:
            return 1
        if not self.p:
            self.p = self.p_init
        if step < self.sample_steps:
            self.samples += 1
            self.c2 += (spread / max(lr, 1e-12) - self.c2) / self.samples  # RUNNINGAVERAGE of S_k / gamma_k
        elif self.samples:
            if spread < self.low * lr * self.c2:
                self.p += 1
            elif spread > self.high * lr * self.c2:
                self.p = max(1, self.p - 1)
        return self.p

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
