"""Look-ahead and trace objectives against explicit float64 computations with torch.func."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _explicit import flat_loss
from torch.func import grad, hessian

from teleport_cli.models.builtin import MLP
from teleport_cli.models.loading import load_model
from teleport_cli.nullspace.derivatives import full_gradient
from teleport_cli.nullspace.lookahead import LookaheadObjective
from teleport_cli.nullspace.losses import cross_entropy_sum
from teleport_cli.nullspace.trace import TraceObjective


@pytest.fixture
def tiny():
    torch.manual_seed(3)
    model = MLP(5, [4], 3).double()
    x = torch.randn(11, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (11,))
    loss, theta, names, sizes = flat_loss(model, x, y)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    return model, batches, loss, theta, names, sizes


def _pick(flat, names, sizes, wanted):
    parts = dict(zip(names, flat.split(sizes)))
    return [parts[w] for w in wanted]


@pytest.mark.parametrize("k", [1, 2])
def test_lookahead_score_and_gradient_match_unrolled_sgd(tiny, k):
    model, batches, loss, theta, names, sizes = tiny
    lr = 0.3

    def unrolled(t):
        for _ in range(k):
            t = t - lr * grad(loss)(t)
        return loss(t)

    params = list(model.parameters())
    wrt = [model.hidden[0].weight, model.head.weight]
    obj = LookaheadObjective(lr, k)
    state = full_gradient(model, batches, cross_entropy_sum, params, 11)
    assert obj.score(model, batches, cross_entropy_sum, params, state, 11) == pytest.approx(unrolled(theta).item(), rel=1e-12)
    got = obj.direction(model, batches, cross_entropy_sum, params, wrt, state, 11)
    want = _pick(grad(unrolled)(theta), names, sizes, ["hidden.0.weight", "head.weight"])
    for g, w in zip(got, want):
        assert torch.allclose(g.reshape(-1), w, rtol=1e-9, atol=1e-12)
    # the parameters are restored exactly
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), theta)


def test_trace_score_and_gradient_match_explicit_hessian(tiny):
    model, batches, loss, theta, names, sizes = tiny
    params = list(model.parameters())
    wrt = [model.hidden[0].weight]
    obj = TraceObjective(probes=3, seed=5)
    vs = torch.stack([torch.cat([t.reshape(-1) for t in v]) for v in obj._vectors(params)])

    def quad(t):
        h = hessian(loss)(t)
        return torch.einsum("pi,ij,pj->", vs, h, vs) / vs.shape[0]

    state = full_gradient(model, batches, cross_entropy_sum, params, 11)
    assert obj.score(model, batches, cross_entropy_sum, params, state, 11) == pytest.approx(quad(theta).item(), rel=1e-10)
    got = obj.direction(model, batches, cross_entropy_sum, params, wrt, state, 11)[0]
    want = _pick(grad(quad)(theta), names, sizes, ["hidden.0.weight"])[0]
    assert torch.allclose(got.reshape(-1), want, rtol=1e-8, atol=1e-12)
    # many probes: the estimate is within 4 standard errors of the exact trace, with the
    # Rademacher variance Var(v^T H v) = 2 * sum_{i != j} H_ij^2
    h = hessian(loss)(theta)
    exact = torch.trace(h).item()
    p = 300
    se = (2 * (h.pow(2).sum() - h.diagonal().pow(2).sum()) / p).sqrt().item()
    est = TraceObjective(probes=p, seed=1).score(model, [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))],
                                                 cross_entropy_sum, params, state, 11)
    assert abs(est - exact) <= 4 * se


def test_stability_guard_compares_explicit_top_eigenvalues_with_the_sgd_edge():
    from teleport_cli import TeleportConfig, teleport

    torch.manual_seed(4)
    model = MLP(6, [5], 3)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    hx, hy = torch.randn(8, 6), torch.randint(0, 3, (8,))
    out = teleport(model, (x, y), TeleportConfig(tau=1.0, steps=3, step_size=0.05, lr=0.7, momentum=0.5, holdout_tolerance=10.0),
                   holdout=(hx, hy))
    st = out.stability

    def top(m):
        loss, theta, _, _ = flat_loss(copy.deepcopy(m).double(), x.double(), y)
        return torch.linalg.eigvalsh(hessian(loss)(theta))[-1].item()

    assert st["edge"] == pytest.approx(2 * 1.5 / 0.7)
    assert st["top_eigenvalue_before"] == pytest.approx(top(model), rel=1e-3)
    assert st["top_eigenvalue_after"] == pytest.approx(top(out.model), rel=1e-3)
    assert st["unstable_after"] == (st["top_eigenvalue_after"] > st["edge"])


def test_levelset_baseline_moves_all_parameters_on_the_level_set(samples):
    """Mishkin et al.'s level-set teleportation: gradient norm up, calibration loss kept, biases move too."""
    from teleport_cli import TeleportConfig, teleport
    from teleport_cli.data.tensors import load_tensor_data

    model = load_model(samples / "mlp_digits_mid.safetensors")[0]
    cal = load_tensor_data(samples / "digits_calibration.safetensors")
    out = teleport(model, cal, TeleportConfig(method="levelset", steps=5, holdout_tolerance=1.0), holdout=cal)
    x64, y = cal.inputs.double(), cal.targets
    m0, m1 = MLP(64, [128, 64], 10).double(), MLP(64, [128, 64], 10).double()
    m0.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    m1.load_state_dict({k: v.double() for k, v in out.model.state_dict().items()})

    def loss_and_gn(m):
        loss = F.cross_entropy(m(x64), y)
        gs = torch.autograd.grad(loss, list(m.parameters()))
        return loss.item(), torch.sqrt(sum((t**2).sum() for t in gs)).item()

    (l0, g0), (l1, g1) = loss_and_gn(m0), loss_and_gn(m1)
    assert out.stats.steps_accepted == 5 and out.stats.objective == "levelset"
    assert abs(l1 - l0) <= 5e-3 * l0 + 1e-6
    assert g1 > 2 * g0
    assert not torch.equal(model.head.bias, out.model.head.bias)
