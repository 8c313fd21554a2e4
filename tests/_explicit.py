"""Explicit float64 references: the loss as a function of all parameters in one flat vector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


def flat_loss(model, x, y):
    """``(loss(theta), theta, names, sizes)``: the mean cross-entropy of ``model`` on ``(x, y)`` as a
    function of the flat parameter vector (``torch.func.functional_call``), and that vector now."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def loss(theta):
        params = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return loss, theta, names, sizes


def explicit_hessian(model, x, y):
    """``(loss, theta, gradient, Hessian)`` by ``torch.autograd.functional``; attention runs on the
    math backend (the fused kernels have no double backward)."""
    loss, theta, _, _ = flat_loss(model, x, y)
    with sdpa_kernel([SDPBackend.MATH]):
        return loss, theta, torch.autograd.functional.jacobian(loss, theta), torch.autograd.functional.hessian(loss, theta)
