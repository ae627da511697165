"""LARS / LAMB against the papers' algorithms written out by hand, 1-d exclusion, and stacked workers."""
import pytest
import torch

from trainers.config import OptimConfig
from trainers.optim import LAMB, LARS, build_optimizer

F64 = torch.float64  # float64 throughout: exact comparisons with the hand-written formulas


def T(values):
    return torch.tensor(values, dtype=F64)


def _param(values, grad=None):
    p = torch.nn.Parameter(T(values))
    p.grad = None if grad is None else T(grad)
    return p


W0 = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]
G1 = [[0.1, 0.3, -0.2], [0.05, -0.4, 0.6]]
G2 = [[-0.3, 0.1, 0.2], [0.4, 0.2, -0.1]]


def _lars_by_hand(nesterov):
    """Algorithm 1 of You et al. 2017, two steps, with eta in the local LR and eps in its denominator."""
    lr, m, wd, eta, eps = 0.5, 0.9, 0.01, 0.02, 1e-8
    w, v = T(W0), torch.zeros(2, 3, dtype=F64)
    for g in (T(G1), T(G2)):
        local = eta * w.norm() / (g.norm() + wd * w.norm() + eps)
        u = lr * local * (g + wd * w)
        v = m * v + u
        w = w - (u + m * v if nesterov else v)
    return w, dict(lr=lr, momentum=m, weight_decay=wd, trust_coefficient=eta, eps=eps, nesterov=nesterov)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_two_steps_match_algorithm_1(nesterov):
    expected, kw = _lars_by_hand(nesterov)
    p = _param(W0, G1)
    opt = LARS([p], **kw)
    opt.step()
    p.grad = T(G2)
    opt.step()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


def test_lars_nesterov_differs_from_heavy_ball():
    assert not torch.allclose(_lars_by_hand(True)[0], _lars_by_hand(False)[0])


def test_lamb_two_steps_match_algorithm_2():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-6, 0.01
    w, m, v = T(W0), torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64)
    for t, g in ((1, T(G1)), (2, T(G2))):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        r = m_hat / (torch.sqrt(v_hat) + eps) + wd * w
        w = w - lr * (w.norm() / r.norm()) * r
    p = _param(W0, G1)
    opt = LAMB([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    opt.step()
    p.grad = T(G2)
    opt.step()
    torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)


def test_zero_weights_use_trust_ratio_one():
    g = T(G1)
    p = _param([[0.0] * 3] * 2, G1)
    LARS([p], lr=0.5, momentum=0.9, weight_decay=0.01).step()
    torch.testing.assert_close(p.detach(), -0.5 * g)  # v = lr * 1 * (g + wd * 0)
    p = _param(W0, [[0.0] * 3] * 2)  # zero gradient: only the decay, at ratio 1
    LARS([p], lr=0.5, momentum=0.9, weight_decay=0.01).step()
    torch.testing.assert_close(p.detach(), T(W0) * (1 - 0.5 * 0.01))
    p = _param([[0.0] * 3] * 2, G1)
    LAMB([p], lr=0.1, eps=1e-6).step()
    torch.testing.assert_close(p.detach(), -0.1 * g / (g.abs() + 1e-6))  # r = m^/(sqrt(v^)+eps) = g/(|g|+eps)


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)).double()
    model(torch.randn(5, 3, dtype=F64)).square().sum().backward()
    return model


@pytest.mark.parametrize("name", ["sgdm", "adamw", "lars", "lamb"])
def test_1d_params_get_no_weight_decay_and_no_trust_ratio(name):
    model = _model()
    cfg = OptimConfig(name=name, weight_decay=0.1, momentum=0.9)
    opt = build_optimizer(model.named_parameters(), cfg, lr=0.01)
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(p) for n, p in model.named_parameters() if n.endswith("weight")
                                                 and p.ndim == 2}
    assert len(no_decay["params"]) == 4  # two biases, LayerNorm weight and bias
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    if name in ("lars", "lamb"):
        assert decay["trust"] and not no_decay["trust"]
    bias, weight = model[0].bias, model[0].weight
    b0, gb, w0 = bias.detach().clone(), bias.grad.clone(), weight.detach().clone()
    opt.step()
    if name in ("sgdm", "lars"):  # first momentum step on the bias: exactly lr * g, no decay, no ratio
        torch.testing.assert_close(bias.detach(), b0 - 0.01 * gb)
        if name == "sgdm":  # the weight does get the coupled decay
            torch.testing.assert_close(weight.detach(), w0 - 0.01 * (weight.grad + 0.1 * w0))
    else:  # first Adam step on the bias: lr * g / (|g| + eps), no decay, no ratio
        torch.testing.assert_close(bias.detach(), b0 - 0.01 * gb / (gb.abs() + cfg.eps))


def test_without_exclusion_one_group_decays_everything():
    opt = build_optimizer(_model().named_parameters(), OptimConfig(name="lars", exclude_1d=False), lr=0.1)
    (group,) = opt.param_groups
    assert len(group["params"]) == 6 and group["trust"] and group["weight_decay"] == OptimConfig().weight_decay


@pytest.mark.parametrize("exclude_1d", [True, False])
@pytest.mark.parametrize("name", ["sgdm", "adamw", "lars", "lamb"])
def test_stacked_workers_equal_separate_workers(name, exclude_1d):
    """K=3 different models stepped as one stack (worker_dim=True) equal three separate optimizers."""
    K, shapes = 3, {"conv": (4, 2, 3, 3), "fc": (5, 4), "bias": (5,), "scalar": ()}
    torch.manual_seed(1)
    # workers differ in scale, so a norm over the whole stack would give wrong per-worker trust ratios
    scale = T([0.1, 1.0, 10.0])
    stack = {n: torch.nn.Parameter(torch.randn(K, *s, dtype=F64) * scale.view(-1, *[1] * len(s)))
             for n, s in shapes.items()}
    single = [{n: torch.nn.Parameter(p[k].detach().clone()) for n, p in stack.items()} for k in range(K)]
    cfg = OptimConfig(name=name, lr=0.1, weight_decay=0.01, trust_coefficient=0.02, nesterov=True,
                      exclude_1d=exclude_1d)
    opt = build_optimizer(stack.items(), cfg, lr=0.1, stacked=True)
    opts = [build_optimizer(ps.items(), cfg, lr=0.1) for ps in single]
    # bias [K, 5] and scalar [K] count as 1-d
    assert [len(g["params"]) for g in opt.param_groups] == ([2, 2] if exclude_1d else [4])
    if name in ("lars", "lamb"):
        assert all(g["worker_dim"] for g in opt.param_groups)
    for _ in range(3):
        for n, p in stack.items():
            p.grad = torch.randn_like(p) / scale.view(-1, *[1] * (p.ndim - 1))
            for k in range(K):
                single[k][n].grad = p.grad[k].clone()
        opt.step()
        for o in opts:
            o.step()
    for n, p in stack.items():
        torch.testing.assert_close(p.detach(), torch.stack([ps[n].detach() for ps in single]), rtol=1e-10, atol=1e-12)


def test_unknown_optimizer_names_choices():
    with pytest.raises(ValueError, match=r"'adagrad'.*sgdm, adamw, lars, lamb"):
        build_optimizer(_model().named_parameters(), OptimConfig(name="adagrad"), lr=0.1)


@pytest.mark.parametrize("name", ["sgdm", "adamw"])
def test_elementwise_optimizers_keep_torchs_param_groups(name):
    """`trust` is LARS's and LAMB's group option; torch's own optimizers get their usual groups (and state_dict)."""
    opt = build_optimizer(_model().named_parameters(), OptimConfig(name=name), lr=0.1)
    assert all("trust" not in g for g in opt.param_groups)
    assert type(opt) is {"sgdm": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
