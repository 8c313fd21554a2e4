"""Finite-difference Hessian-vector products against torch.func.hessian in float64.

Three models under 5k parameters, trained here on sklearn's digits (mid-training and
converged): a tanh MLP, a ReLU conv net with BatchNorm in eval mode, and a hard-swish MLP
written as ``x * hardsigmoid(x)`` (torch has no double backward of hardsigmoid, as in
MobileNetV3's squeeze-excite) whose float64 reference uses the clamp form
``x * clamp(x + 3, 0, 6) / 6``. The products are taken by the tool in float32; the reference
Hessian is explicit, in float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from teleport_cli.data.tensors import TensorData
from teleport_cli.nullspace.bases import layer_basis
from teleport_cli.nullspace.capture import capture_grams
from teleport_cli.nullspace.derivatives import full_gradient
from teleport_cli.nullspace.hvp import (
    HessianVectorProduct,
    base_epsilon,
    relative_difference,
)
from teleport_cli.nullspace.layers import weight_blocks
from teleport_cli.nullspace.losses import LOSS_FUNCTIONS
from teleport_cli.nullspace.selection import find_layers

N = 256
LOSS = LOSS_FUNCTIONS["ce"]


class Act(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.reference = kind, False

    def forward(self, x):
        if self.kind == "tanh":
            return torch.tanh(x)
        if self.kind == "relu":
            return torch.relu(x)
        return x * torch.clamp(x + 3, 0, 6) / 6 if self.reference else x * F.hardsigmoid(x)


def build(kind: str) -> nn.Module:
    if kind == "conv":  # 60 + 12 + 970 = 1042 parameters
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), Act("relu"),
                             nn.AvgPool2d(2), nn.Flatten(), nn.Linear(96, 10))
    return nn.Sequential(nn.Linear(64, 40), Act(kind), nn.Linear(40, 10))  # 3010 parameters


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:N], dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target[:N])


CACHE: dict = {}


def case(kind: str, stage: str):
    """(float32 model in eval, batches, float64 Hessian, float64 gradient) after training."""
    key = (kind, stage)
    if key not in CACHE:
        torch.manual_seed(0)
        x, y = digits()
        model = build(kind)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(25 if stage == "mid" else 600):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
        ref = copy.deepcopy(model).double()
        for m in ref.modules():
            if isinstance(m, Act):
                m.reference = True
        names = [n for n, _ in ref.named_parameters()]
        shapes = [p.shape for _, p in ref.named_parameters()]
        sizes = [p.numel() for _, p in ref.named_parameters()]
        theta = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])

        def loss(t):
            return F.cross_entropy(functional_call(ref, {n: a.reshape(s) for n, a, s in zip(names, t.split(sizes), shapes)}, (x.double(),)), y)

        h = hessian(loss)(theta)
        g = torch.func.grad(loss)(theta)
        CACHE[key] = (model, TensorData(x, y).batches(64, "cpu"), h, g)
    return CACHE[key]


def flat(ts):
    return torch.cat([t.detach().double().reshape(-1) for t in ts])


def unflat(v, params):
    return [t.reshape(p.shape).to(p.dtype) for t, p in zip(v.split([p.numel() for p in params]), params)]


def vectors(model, batches, h, g64):
    """v = g, a random v, and the look-ahead's vector g(theta - lr g) at lr = 1/lambda_max."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = full_gradient(model, batches, LOSS, params, N).grads
    rnd = [torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) for p in params]
    lr = 1.0 / float(torch.linalg.eigvalsh(h)[-1])
    moved = copy.deepcopy(model)
    mp = [p for p in moved.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, d in zip(mp, g):
            p.sub_(lr * d)
    ahead = full_gradient(moved, batches, LOSS, mp, N).grads
    return params, g, {"g": g, "random": rnd, "lookahead": ahead}


def projector(model, batches):
    """Project a full-parameter vector onto the null spaces (tau 0.99) of the model's layers."""
    layers, _ = find_layers(model)
    accs = capture_grams(model, layers, batches, lambda k: None)
    bases = {s.name: layer_basis(s.name, accs[s.name].gram, 0.99) for s, _ in layers}
    params = [p for p in model.parameters() if p.requires_grad]
    where = {id(m.weight): s for s, m in layers}

    def project(v):  # v: flat float64 over params -> flat projected weights of the layers
        parts = unflat(v.double(), [p.double() for p in params])
        return torch.cat([bases[where[id(p)].name].project(weight_blocks(where[id(p)], t)).reshape(-1)
                          for p, t in zip(params, parts) if id(p) in where])

    assert sum(b.null_dim for b in bases.values()) > 0
    return project


CASES = [(k, s) for k in ("tanh", "conv", "hardswish") for s in ("mid", "converged")]


# measured failures (kept as strict xfails, see docs/hvp.md): hard-swish has kinks at x = -3 and 3
# where a finite difference of gradients jumps; torch has no double backward to fall back to.
# Measured (float32 products, float64 reference): converged, forward errors 0.92 (v = g), 0.51 and
# 0.99 while float32 double backward of the clamp form is within 4e-4; mid-training the forward
# differences pass (<= 1e-2) but central ones reach 5e-3, 5.7e-2 and 1.0e-2.
KNOWN = {
    ("hardswish", "converged", v): "kinks of hard-swish: forward differences wrong by 0.5-0.99 at convergence" for v in ("g", "random", "lookahead")
} | {
    ("hardswish", "mid", v): "kinks of hard-swish: central differences miss 1e-3 (5e-3 to 5.7e-2)" for v in ("g", "random", "lookahead")
}


@pytest.mark.parametrize("kind,stage", CASES)
@pytest.mark.parametrize("vector", ["g", "random", "lookahead"])
def test_auto_products_match_the_float64_hessian(kind, stage, vector, request):
    if (kind, stage, vector) in KNOWN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN[kind, stage, vector], strict=True))
    model, batches, h, g64 = case(kind, stage)
    params, g, vs = vectors(model, batches, h, g64)
    project = projector(model, batches)
    v = vs[vector]
    ref = h @ flat(v)
    auto = HessianVectorProduct("auto")
    got = flat(auto(model, batches, LOSS, params, v, params, N, grads=g))
    err = relative_difference([got], [ref])
    if kind == "hardswish":  # no double backward: auto must keep finite differences
        assert auto.mode == "forward", auto.note
    if auto.mode == "forward":
        assert err <= 1e-2, (auto.to_dict(), err)
        central = flat(HessianVectorProduct("central")(model, batches, LOSS, params, v, params, N))
        assert relative_difference([central], [ref]) <= 1e-3, relative_difference([central], [ref])
    else:  # exact in float32 against float64
        assert auto.mode == "exact" and err <= 1e-3, (err, auto.note)
    a, b = project(got), project(ref)
    cos = float(a @ b / (a.norm() * b.norm()))
    assert cos >= 0.999, cos


def test_auto_takes_finite_differences_on_tanh_and_exact_on_relu():
    # at convergence the float32 gradient of the tanh MLP is so small that its roundoff makes
    # eps and eps/4 disagree (measured 0.044): auto then takes double backward, as it should
    for kind, stage, expect in (("tanh", "mid", "forward"), ("tanh", "converged", "exact"), ("conv", "converged", "exact")):
        model, batches, h, g64 = case(kind, stage)
        params, g, _ = vectors(model, batches, h, g64)
        auto = HessianVectorProduct("auto")
        auto(model, batches, LOSS, params, g, params, N, grads=g)
        assert auto.mode == expect, (kind, auto.to_dict())
        assert (auto.disagreement <= 1e-2) == (expect == "forward")


@pytest.mark.parametrize("stage", ["mid", "converged"])
def test_the_chosen_epsilon_lies_in_the_decade_of_least_error(stage):
    model, batches, h, g64 = case("tanh", stage)
    params, g, vs = vectors(model, batches, h, g64)
    for name, v in vs.items():
        ref = h @ flat(v)
        base = base_epsilon(params, v)
        errors = {}
        for k in range(-8, 7):  # eps * 10^(k/2)
            fd = HessianVectorProduct("forward")
            fd.factor = 10 ** (k / 2)
            errors[k] = relative_difference([flat(fd(model, batches, LOSS, params, v, params, N, grads=g))], [ref])
        best = min(errors, key=errors.get)
        assert abs(best) <= 2, (stage, name, {10 ** (k / 2) * base: e for k, e in errors.items()})


def test_scaling_v_leaves_the_error_unchanged():
    model, batches, h, g64 = case("tanh", "mid")
    params, g, vs = vectors(model, batches, h, g64)
    v = vs["random"]
    errors = []
    for scale in (1e-3, 1.0, 1e3):
        sv = [t * scale for t in v]
        got = flat(HessianVectorProduct("forward")(model, batches, LOSS, params, sv, params, N, grads=g))
        errors.append(relative_difference([got], [h @ flat(sv)]))
    assert max(errors) <= 1e-2
    assert max(errors) - min(errors) <= 0.05 * max(errors), errors


def test_exact_mode_names_the_missing_double_backward():
    from teleport_cli.errors import InputError

    model, batches, h, g64 = case("hardswish", "mid")
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(InputError, match="double backward"):
        HessianVectorProduct("exact")(model, batches, LOSS, params, params, params, N)
    assert math.isfinite(base_epsilon(params, params))
