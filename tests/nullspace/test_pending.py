"""PendingGradient and the look-ahead's forward-pass score against the eager passes they replace.

With one batch the pending gradient is the backward of the same forward pass: the same float
operations as ``full_gradient``, so the values must be identical; the look-ahead's last virtual
step through ``functional_call`` must give the same score and direction as the in-place step
(taken when the batches have no length). All against float64 references too.
"""

import torch
import torch.nn.functional as F
from torch import nn

from teleport_cli.nullspace.derivatives import PendingGradient, full_gradient
from teleport_cli.nullspace.lookahead import LookaheadObjective


def _sum_ce(logits, y):
    return F.cross_entropy(logits, y, reduction="sum")


class _Stream:
    """Re-iterable batches without ``__len__`` (the eager paths)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _setup(seed=0, n=48, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    return model, x, y


def test_one_batch_pending_gradient_is_identical_to_full_gradient():
    model, x, y = _setup()
    params = list(model.parameters())
    ref = full_gradient(model, [(x, y)], _sum_ce, params, len(y))
    pending = PendingGradient(model, [(x, y)], _sum_ce, params, len(y))
    assert pending.loss == ref.loss
    state = pending.gradient()
    assert state.loss == ref.loss and state.grad_norm == ref.grad_norm
    assert all(torch.equal(a, b) for a, b in zip(state.grads, ref.grads))
    assert pending.gradient() is state  # computed once


def test_several_batches_fall_back_to_full_gradient():
    model, x, y = _setup()
    params = list(model.parameters())
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(y), 16)]
    pending = PendingGradient(model, batches, _sum_ce, params, len(y))
    m64 = model.double()
    loss64 = F.cross_entropy(m64(x.double()), y).item()
    model.float()
    assert abs(pending.loss - loss64) <= 1e-6 * abs(loss64)
    ref = full_gradient(model, batches, _sum_ce, params, len(y))
    assert all(torch.equal(a, b) for a, b in zip(pending.gradient().grads, ref.grads))


def test_lookahead_forward_score_matches_the_in_place_step_and_float64():
    model, x, y = _setup(1)
    params = list(model.parameters())
    lr, n = 0.3, len(y)
    fast, eager = LookaheadObjective(lr, hvp="exact"), LookaheadObjective(lr, hvp="exact")
    one, stream = [(x, y)], _Stream([(x, y)])
    before = [p.detach().clone() for p in params]
    state = full_gradient(model, one, _sum_ce, params, n)
    score_fast = fast.score(model, one, _sum_ce, params, state, n)
    score_eager = eager.score(model, stream, _sum_ce, params, state, n)
    assert score_fast == score_eager
    d_fast = fast.direction(model, one, _sum_ce, params, params, state, n)
    d_eager = eager.direction(model, stream, _sum_ce, params, params, state, n)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(d_fast, d_eager))
    assert all(torch.equal(p, q) for p, q in zip(params, before))  # the parameters are restored
    # float64 reference: F(theta) = L(theta - lr grad L(theta)), differentiated by autograd
    m64 = model.double()
    p64 = [p.detach().clone().requires_grad_(True) for p in m64.parameters()]
    names = [k for k, _ in m64.named_parameters()]

    def loss(ps):
        return F.cross_entropy(torch.func.functional_call(m64, dict(zip(names, ps)), (x.double(),)), y)

    g = torch.autograd.grad(loss(p64), p64, create_graph=True)
    f = loss([p - lr * gi for p, gi in zip(p64, g)])
    ref = torch.autograd.grad(f, p64)
    assert abs(score_fast - f.item()) <= 1e-6 * f.item()
    for a, b in zip(d_fast, ref):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-6)
