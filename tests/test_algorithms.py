"""Pure update rules of the K-worker algorithms (trainers/algorithms.py), on crafted numbers."""
import pytest
import torch

from trainers import algorithms as alg


def test_average_and_spread():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    before = x.clone()
    s = alg.spread(x, x.mean(0))
    avg = alg.average_(x)
    # deviations from the mean [2, 4]: (-1, -2) and (1, 2) -> squared norms 5 and 5 -> S = 5
    assert float(s) == pytest.approx(5.0)
    assert torch.equal(avg, torch.tensor([2.0, 4.0]))
    assert torch.equal(x, torch.tensor([[2.0, 4.0], [2.0, 4.0]]))
    assert not torch.equal(x, before)


def test_slowmo_plain_averaging_and_momentum():
    anchor, u = torch.tensor([1.0, 1.0]), torch.zeros(2)
    alg.slowmo_(anchor, u, torch.tensor([0.5, 2.0]), lr=0.1, alpha=1.0, beta=0.0)
    assert torch.allclose(anchor, torch.tensor([0.5, 2.0]))  # alpha=1, beta=0: the mean
    assert torch.allclose(u, torch.tensor([5.0, -10.0]))  # (anchor - mean) / gamma

    # two rounds with beta = 0.5, alpha = 2, gamma = 0.1, by hand
    anchor, u = torch.tensor([1.0]), torch.zeros(1)
    alg.slowmo_(anchor, u, torch.tensor([0.9]), lr=0.1, alpha=2.0, beta=0.5)
    # d = 1, u = 1, anchor = 1 - 2 * 0.1 * 1 = 0.8
    assert u.item() == pytest.approx(1.0) and anchor.item() == pytest.approx(0.8)
    alg.slowmo_(anchor, u, torch.tensor([0.7]), lr=0.1, alpha=2.0, beta=0.5)
    # d = 1, u = 0.5 + 1 = 1.5, anchor = 0.8 - 0.2 * 1.5 = 0.5
    assert u.item() == pytest.approx(1.5) and anchor.item() == pytest.approx(0.5)


def test_slowmo_nesterov():
    anchor, u = torch.tensor([1.0]), torch.tensor([2.0])
    alg.slowmo_(anchor, u, torch.tensor([0.9]), lr=0.1, alpha=1.0, beta=0.5, nesterov=True)
    # d = 1, u = 0.5 * 2 + 1 = 2, step = d + beta * u = 2, anchor = 1 - 0.1 * 2 = 0.8
    assert u.item() == pytest.approx(2.0) and anchor.item() == pytest.approx(0.8)
    # with beta = 0 Nesterov is plain SlowMo
    a1, u1, a2, u2 = torch.tensor([1.0]), torch.zeros(1), torch.tensor([1.0]), torch.zeros(1)
    alg.slowmo_(a1, u1, torch.tensor([0.3]), 0.1, 0.7, 0.0, nesterov=True)
    alg.slowmo_(a2, u2, torch.tensor([0.3]), 0.1, 0.7, 0.0, nesterov=False)
    assert torch.allclose(a1, a2)


def _doubly_stochastic(w: torch.Tensor) -> bool:
    ones = torch.ones(len(w), dtype=w.dtype)
    return bool((w >= 0).all()) and torch.allclose(w.sum(0), ones) and torch.allclose(w.sum(1), ones)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_mixing_matrices_are_doubly_stochastic(k):
    g = torch.Generator().manual_seed(0)
    assert _doubly_stochastic(alg.ring_matrix(k))
    assert _doubly_stochastic(alg.complete_matrix(k))
    for t in range(6):
        assert _doubly_stochastic(alg.exponential_matrix(k, t))
        assert _doubly_stochastic(alg.matching_matrix(k, g))


def test_ring_matrix():
    w = alg.ring_matrix(5)
    assert torch.allclose(w[0], torch.tensor([1 / 3, 1 / 3, 0, 0, 1 / 3], dtype=w.dtype))
    assert alg.neighbours(w) == 2
    assert torch.allclose(alg.ring_matrix(3), alg.complete_matrix(3))  # K = 3: the ring is complete
    assert torch.allclose(alg.ring_matrix(2), alg.complete_matrix(2))
    assert alg.neighbours(alg.ring_matrix(2)) == 1
    assert alg.neighbours(alg.ring_matrix(1)) == 0


def test_exponential_matrix_cycles_powers_of_two():
    k = 8
    peers = []
    for t in range(4):
        w = alg.exponential_matrix(k, t)
        row = w[0].clone()
        assert row[0] == 0.5 and alg.neighbours(w) == 1
        row[0] = 0
        peers.append(int(row.nonzero()))
    assert peers == [1, 2, 4, 1]  # distances 2^0, 2^1, 2^2, then again


def test_matching_matrix_is_a_random_pairing():
    g = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(20):
        w = alg.matching_matrix(6, g)
        assert torch.allclose(w, w.T)
        assert torch.all(torch.diagonal(w) == 0.5)  # K even: everybody is paired
        assert alg.neighbours(w) == 1
        seen.add(tuple(int(j) for j in (w[0] > 0).nonzero().flatten()))
    assert len(seen) > 2  # partners change between steps
    w = alg.matching_matrix(5, g)
    assert int((torch.diagonal(w) == 1).sum()) == 1  # K odd: one worker sits out


def test_mix_applies_w():
    x = torch.tensor([[0.0], [3.0], [6.0]])
    alg.mix_(x, alg.complete_matrix(3))
    assert torch.allclose(x, torch.full((3, 1), 3.0))
    x = torch.tensor([[0.0], [2.0], [4.0], [6.0]])
    alg.mix_(x, alg.exponential_matrix(4, 1))  # everyone averages with the worker two ahead
    assert torch.allclose(x.flatten(), torch.tensor([2.0, 4.0, 2.0, 4.0]))


def test_gradient_stats_on_crafted_gradients():
    grads = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    big_g, sigma2 = alg.gradient_stats(grads)
    # g = (2, 0); sigma^2 = (1 + 1) / (2 - 1) = 2; G = ||g||^2 - sigma^2 / K = 4 - 1 = 3
    assert sigma2 == pytest.approx(2.0) and big_g == pytest.approx(3.0)
    same = torch.tensor([[1.0, 2.0]] * 4)
    big_g, sigma2 = alg.gradient_stats(same)
    assert sigma2 == 0 and big_g == pytest.approx(5.0)
    with pytest.raises(ValueError):
        alg.gradient_stats(torch.ones(1, 3))


def test_dynamic_steps_rule():
    rule = lambda g, s: alg.dynamic_steps(g, s, alpha=10.0, eps=1e-6, j_min=4, j_max=64)
    assert rule(3.0, 2.0) == 14  # 10 * 3 / (2 + eps) = 14.99999 truncates to 14
    assert rule(1.0, 1.0) == 9  # 9.99999 truncates
    assert rule(0.1, 1.0) == 4  # below J_min
    assert rule(-5.0, 1.0) == 4  # noise dominates: G < 0
    assert rule(100.0, 1.0) == 64  # above J_max
    assert rule(5.0, 0.0) == 64  # identical gradients: G / eps is huge
    assert rule(float("nan"), 1.0) == 4
    assert alg.dynamic_steps(3.0, 2.0, alpha=10.0, eps=1e-6, j_min=7, j_max=7) == 7


def test_period_controller_warmup_sampling_and_control():
    c = alg.PeriodController(p_init=4, warmup_steps=10, sample_steps=30)
    assert c.period(0) == 1 and c.period(9) == 1
    assert c.update(5, spread=100.0, lr=0.1) == 1  # warm-up: period 1, nothing sampled
    assert c.samples == 0 and c.period(10) == 4
    # sampling phase: C2 is the running mean of S / lr, the period stays p_init
    assert c.update(13, spread=0.2, lr=0.1) == 4  # S/lr = 2
    assert c.update(17, spread=0.4, lr=0.1) == 4  # S/lr = 4
    assert c.c2 == pytest.approx(3.0) and c.samples == 2
    # after K_s: compare S with lr * C2 (lr of that step)
    assert c.update(30, spread=0.05 * 3.0 * 0.69, lr=0.05) == 5  # S < 0.7 lr C2 -> p + 1
    assert c.update(35, spread=0.05 * 3.0 * 1.0, lr=0.05) == 5  # in the band -> unchanged
    assert c.update(40, spread=0.05 * 3.0 * 1.31, lr=0.05) == 4  # S > 1.3 lr C2 -> p - 1
    assert c.c2 == pytest.approx(3.0)  # no more sampling
    c.p = 1
    assert c.update(50, spread=100.0, lr=0.05) == 1  # never below 1
    state = c.state_dict()
    d = alg.PeriodController(p_init=4, warmup_steps=10, sample_steps=30)
    d.load_state_dict(state)
    assert d == c


def test_period_controller_without_samples_keeps_p_init():
    c = alg.PeriodController(p_init=3, warmup_steps=50, sample_steps=40)  # warm-up covers [0, K_s)
    assert c.update(60, spread=1e9, lr=0.1) == 3
    assert c.update(70, spread=0.0, lr=0.1) == 3
