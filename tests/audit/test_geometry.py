"""Geometry figures against an explicit float64 Hessian of a tiny model."""

import pytest
import torch
import torch.nn.functional as F
from _explicit import explicit_hessian
from torch import nn

from teleport_cli.audit import geometry
from teleport_cli.audit.geometry import lanczos_top, measure
from teleport_cli.data.tensors import TensorData
from teleport_cli.models.builtin import MLP
from teleport_cli.nullspace.losses import cross_entropy_sum


class TinyAttention(nn.Module):
    """One self-attention block through F.scaled_dot_product_attention, then a linear head.

    On the CPU, SDPA picks its fused flash kernel, which has no double backward: without the
    math backend that hessian_vector_product selects, these Hessian-vector products fail.
    """

    def __init__(self, d=4, tokens=3, classes=3):
        super().__init__()
        self.tokens, self.d = tokens, d
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = x.view(x.shape[0], self.tokens, self.d)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        return self.head(F.scaled_dot_product_attention(q, k, v).mean(1))



def _setup(model_cls=MLP, n=40, d_in=5, **kw):
    torch.manual_seed(1)
    model = model_cls(**kw).double().eval()
    x = torch.randn(n, d_in, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, x, y, TensorData(x, y).batches(16)  # 3 uneven batches: streaming is exercised


@pytest.mark.parametrize("model_cls, kw", [(MLP, {"in_features": 5, "hidden": [6], "num_classes": 3}), (TinyAttention, {})],
                         ids=["mlp", "sdpa-attention"])
def test_measure_matches_explicit_hessian(model_cls, kw):
    d_in = 5 if model_cls is MLP else 12
    model, x, y, batches = _setup(model_cls, d_in=d_in, **kw)
    loss, theta, g, h = explicit_hessian(model, x, y)
    evals = torch.linalg.eigvalsh(h)
    p = theta.numel()
    geo = measure(model, batches, cross_entropy_sum, iterations=p, probes=400, radius=0.3, seed=0, rtol=1e-12)

    assert geo.parameters == p
    assert geo.loss == pytest.approx(loss(theta).item(), rel=1e-12)
    assert geo.grad_norm == pytest.approx(g.norm().item(), rel=1e-10)
    # top eigenvalue: the largest algebraic one, within the reported residual (and roundoff)
    assert abs(geo.top_eigenvalue - evals[-1].item()) <= geo.eigenvalue_residual + 1e-9 * evals.abs().max().item()
    assert geo.top_eigenvalue == pytest.approx(evals[-1].item(), rel=1e-7)
    # Hutchinson: within 4 standard errors of the exact trace, and the standard error is the
    # theoretical one for Rademacher probes, sqrt(2 * sum_{i != j} H_ij^2 / probes), within 25%
    exact = torch.trace(h).item()
    assert abs(geo.trace - exact) <= 4 * geo.trace_stderr
    theory = ((2 * ((h**2).sum() - (h.diagonal() ** 2).sum())) / geo.trace_probes).sqrt().item()
    assert geo.trace_stderr == pytest.approx(theory, rel=0.25)
    # sharpness: direct evaluation at theta + rho g/||g||
    direct = loss(theta + 0.3 * g / g.norm()).item() - loss(theta).item()
    assert geo.sharpness == pytest.approx(direct, rel=1e-9, abs=1e-12)
    # the weights are unchanged
    assert torch.equal(torch.cat([q.detach().reshape(-1) for q in model.parameters()]), theta)


def test_few_lanczos_steps_stay_within_their_residual_bound():
    model, x, y, batches = _setup(in_features=5, hidden=[6], num_classes=3)
    _, _, _, h = explicit_hessian(model, x, y)
    evals = torch.linalg.eigvalsh(h)
    geo = measure(model, batches, cross_entropy_sum, iterations=6, probes=2, seed=3, rtol=0.0)
    assert geo.lanczos_iterations == 6
    # a Ritz value lies inside the spectrum and within its residual of an eigenvalue
    assert geo.top_eigenvalue <= evals[-1].item() + 1e-10
    assert (evals - geo.top_eigenvalue).abs().min().item() <= geo.eigenvalue_residual * (1 + 1e-6) + 1e-10


@pytest.mark.parametrize("reorth", [True, False])
def test_lanczos_finds_the_largest_algebraic_not_largest_magnitude(monkeypatch, reorth):
    """Eigenvalues in [-10, 3]: power iteration would return -10, Lanczos must return 3."""
    if not reorth:
        monkeypatch.setattr(geometry, "REORTH_BUDGET", 0)
    gen = torch.Generator().manual_seed(0)
    n = 120
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.cat([torch.tensor([-10.0, 3.0]), torch.linspace(-2, 2, n - 2)]).double()
    a = q @ torch.diag(lam) @ q.T

    def matvec(v):
        return [(a @ v[0].reshape(-1)).reshape(v[0].shape)]

    theta, residual, used = lanczos_top(matvec, [torch.randn(n, generator=gen, dtype=torch.float64)], iterations=80, rtol=1e-10)
    assert theta == pytest.approx(3.0, abs=max(residual, 1e-8))
    assert residual <= 1e-9 and used <= 80
