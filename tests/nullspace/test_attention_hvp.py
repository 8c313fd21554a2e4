"""Hessian-vector products through attention (timm ViT, nn.MultiheadAttention) against
central finite differences of the gradient in float64, and the gradient against finite
differences of the loss."""

import pytest
import timm
import torch
from torch import nn

from teleport_cli.nullspace.derivatives import full_gradient, hessian_vector_product
from teleport_cli.nullspace.losses import cross_entropy_sum


class AttentionClassifier(nn.Module):
    """Tokens -> nn.MultiheadAttention (fused SDPA path: need_weights=False) -> mean -> head."""

    def __init__(self, e=8, classes=3, cross=False):
        super().__init__()
        self.inp = nn.Linear(4, e)
        self.attn = nn.MultiheadAttention(e, 2, batch_first=True)
        self.head = nn.Linear(e, classes)
        self.cross = cross

    def forward(self, x):
        t = self.inp(x)
        kv = t.flip(1) * 0.5 if self.cross else t
        return self.head(self.attn(t, kv, kv, need_weights=False)[0].mean(1))


def _shift(params, vector, eps):
    with torch.no_grad():
        for p, v in zip(params, vector):
            p += eps * v


def _check_hvp_and_gradient(model, x, y):
    params = list(model.parameters())
    batches = [(x[:1], y[:1]), (x[1:], y[1:])]
    n = len(y)
    state = full_gradient(model, batches, cross_entropy_sum, params, n)
    # the gradient pass (default kernels) against a directional finite difference of the loss
    u = [torch.randn_like(p) for p in params]
    h = 1e-6
    _shift(params, u, h)
    lp = full_gradient(model, batches, cross_entropy_sum, params, n).loss
    _shift(params, u, -2 * h)
    lm = full_gradient(model, batches, cross_entropy_sum, params, n).loss
    _shift(params, u, h)
    directional = sum(float((g * t).sum()) for g, t in zip(state.grads, u))
    assert (lp - lm) / (2 * h) == pytest.approx(directional, rel=1e-6, abs=1e-9)
    # H g with the math attention backend against (g(theta + e g) - g(theta - e g)) / 2e
    wrt = params
    hv = hessian_vector_product(model, batches, cross_entropy_sum, params, state.grads, wrt, n)
    eps = 1e-6 / state.grad_norm
    _shift(params, state.grads, eps)
    gp = full_gradient(model, batches, cross_entropy_sum, params, n).grads
    _shift(params, state.grads, -2 * eps)
    gm = full_gradient(model, batches, cross_entropy_sum, params, n).grads
    _shift(params, state.grads, eps)
    fd = torch.cat([((a - b) / (2 * eps)).reshape(-1) for a, b in zip(gp, gm)])
    got = torch.cat([t.reshape(-1) for t in hv])
    assert got.norm() > 0
    assert (got - fd).norm() <= 1e-6 * fd.norm()


def test_timm_vit_hvp_needs_and_gets_the_math_backend():
    model = timm.create_model("test_vit", num_classes=3, img_size=32).double().eval()
    assert model.blocks[0].attn.fused_attn  # the fused F.scaled_dot_product_attention path
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    # the fused CPU kernel has no double backward: a plain HVP fails
    params = list(model.parameters())
    g = torch.autograd.grad(cross_entropy_sum(model(x), y), params, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(sum((a * a.detach()).sum() for a in g), params)
    _check_hvp_and_gradient(model, x, y)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_multihead_attention_hvp_matches_finite_differences(cross):
    model = AttentionClassifier(cross=cross).double().eval()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    _check_hvp_and_gradient(model, x, torch.tensor([0, 1, 2]))
