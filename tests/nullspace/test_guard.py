"""The guard's confidence bound and the step-back rule, against independent float64 computations.

The bound (docs/guard.md): with ``d_i = l_i(W) - l_i(W0)`` the paired per-sample loss changes on
the guard's ``n`` samples, a point is trusted when
``|mean d| + z s / sqrt(n) <= trust_tolerance * |L0| + 1e-6 + floor`` (``s`` the sample standard
deviation, n - 1 in the denominator; ``z`` is ``--guard-z``). Here the per-sample losses are recomputed in float64 with
``F.cross_entropy(reduction="none")`` on a float64 copy of each model, not through the guard's code.
"""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from _ckpt import ROOT

from teleport_cli.config import TeleportConfig
from teleport_cli.models.builtin import MLP
from teleport_cli.nullspace.ascent import ascend
from teleport_cli.nullspace.bases import layer_basis
from teleport_cli.nullspace.capture import capture_grams
from teleport_cli.nullspace.guard import Guard
from teleport_cli.nullspace.losses import LOSS_FUNCTIONS
from teleport_cli.nullspace.selection import find_layers

CE = LOSS_FUNCTIONS["ce"]


def _losses64(model, x, y) -> list[float]:
    m = MLP(8, [12], 4).double().eval()
    m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        return F.cross_entropy(m(x.double()), y, reduction="none").tolist()


def _bound(model, original, x, y, z=TeleportConfig().guard_z) -> tuple[float, float, float]:
    """(|mean d| + z s / sqrt(n), |mean d|, L0) from float64 per-sample losses (z: the default --guard-z)."""
    l0, l1 = _losses64(original, x, y), _losses64(model, x, y)
    d = [b - a for a, b in zip(l0, l1)]
    return abs(statistics.fmean(d)) + z * statistics.stdev(d) / math.sqrt(len(d)), abs(statistics.fmean(d)), statistics.fmean(l0)


def _setup(seed=0, n_fit=6, n_guard=20):
    torch.manual_seed(seed)
    model = MLP(8, [12], 4).eval()
    x, y = torch.randn(n_fit, 8), torch.randint(0, 4, (n_fit,))
    gx, gy = torch.randn(n_guard, 8), torch.randint(0, 4, (n_guard,))
    return model, [(x, y)], (gx, gy)


def _moved(model, scale, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = MLP(8, [12], 4).eval()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("z", [1.5, 2.0])
@pytest.mark.parametrize("n_guard", [5, 20])
def test_confidence_bound_matches_an_independent_computation(n_guard, z):
    model, _, (gx, gy) = _setup(n_guard=n_guard)
    assert Guard(model, [(gx, gy)], CE, 1.0, 1.0).z == TeleportConfig().guard_z  # the class's default is the CLI's
    for scale in (1e-3, 1e-2, 5e-2):
        moved = _moved(model, scale)
        bound, mean, l0 = _bound(moved, model, gx, gy, z)
        assert bound > 1e-4  # well above float32 roundoff
        # trust tolerances just above and just below the independent bound: the rule flips there
        for factor, expected in ((1.001, True), (0.999, False)):
            tol = (bound * factor - 1e-6) / l0
            gate, trusted = Guard(model, [(gx, gy)], CE, tolerance=10.0, trust_tolerance=tol, z=z).check(moved)
            assert gate and trusted is expected, (scale, factor)
        # the spread term is there: a tolerance the mean alone meets is not enough
        if bound > 1.01 * mean:
            tol = ((mean + bound) / 2 - 1e-6) / l0
            assert not Guard(model, [(gx, gy)], CE, tolerance=10.0, trust_tolerance=tol, z=z).check(moved)[1]
        # the sample standard deviation (n - 1), not the population one (n)
        pop = mean + z * statistics.pstdev([b - a for a, b in zip(_losses64(model, gx, gy), _losses64(moved, gx, gy))]) / math.sqrt(n_guard)
        tol = ((pop + bound) / 2 - 1e-6) / l0
        assert not Guard(model, [(gx, gy)], CE, tolerance=10.0, trust_tolerance=tol, z=z).check(moved)[1]
        # the gate is the calibration rule on the guard's mean loss
        tol = (mean * 1.001 - 1e-6) / l0, (mean * 0.999 - 1e-6) / l0
        assert Guard(model, [(gx, gy)], CE, tolerance=tol[0], trust_tolerance=None).check(moved) == (True, True)
        assert Guard(model, [(gx, gy)], CE, tolerance=tol[1], trust_tolerance=None).check(moved) == (False, False)


def _ascend(model, fit, guard, rule, trust, steps=8):
    moved = MLP(8, [12], 4).eval()
    moved.load_state_dict(model.state_dict())
    layers, _ = find_layers(moved)
    accs = capture_grams(moved, layers, fit)
    bases = {s.name: layer_basis(s.name, accs[s.name].gram, 1.0) for s, _ in layers}
    path = []

    def on_step(accepted, record, log):
        if record is not None:  # the weights of each accepted point, as the loop holds them
            path.append({k: v.detach().clone() for k, v in moved.state_dict().items()})

    config = TeleportConfig(tau=1.0, steps=steps, step_size=0.05, max_step=1.0, device="cpu")
    stats = ascend(moved, fit, layers, bases, config, CE, on_step=on_step, guard=[guard], guard_tolerance=10.0,
                   guard_trust=trust, guard_rule=rule)
    return moved, stats, path


def test_step_back_lands_on_the_furthest_point_the_guard_trusts():
    model, fit, (gx, gy) = _setup()
    # the accepted path does not depend on the trust tolerance under step_back (only the gate rejects)
    _, free, path = _ascend(model, fit, (gx, gy), "step_back", None)
    assert free.step_backs == 0 and len(path) == free.steps_accepted >= 5
    bounds = []
    for state in path:
        m = MLP(8, [12], 4).eval()
        m.load_state_dict(state)
        bounds.append(_bound(m, model, gx, gy))
    l0 = bounds[0][2]
    values = [b for b, _, _ in bounds]
    # a threshold between the bounds of the path's 3rd point and its largest: later points are not trusted
    threshold = (sorted(values)[2] + sorted(values)[3]) / 2
    trust = (threshold - 1e-6) / l0
    furthest = max(i + 1 for i, b in enumerate(values) if b <= threshold)
    assert furthest < len(path)  # the case must step back
    moved, stats, path2 = _ascend(model, fit, (gx, gy), "step_back", trust)
    assert len(path2) == len(path) and all(torch.equal(a[k], b[k]) for a, b in zip(path, path2) for k in a)
    assert stats.step_backs == len(path) - furthest and stats.steps_accepted == furthest
    final = moved.state_dict()
    assert all(torch.equal(final[k], path[furthest - 1][k]) for k in final)
    # the reported state is that point's: its calibration loss and gradient norm, recomputed
    m = MLP(8, [12], 4).eval()
    m.load_state_dict(path[furthest - 1])
    (x, y), = fit
    loss = F.cross_entropy(m(x), y, reduction="sum") / len(y)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    assert stats.loss_after == pytest.approx(float(loss.detach()), rel=1e-5)
    assert stats.grad_norm_after == pytest.approx(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))), rel=1e-4)

    # the default rule rejects the untrusted steps instead: every accepted point is trusted, none undone
    _, gated, path3 = _ascend(model, fit, (gx, gy), "gate", trust)
    assert gated.step_backs == 0
    # the JSON's rejections name the rule: here the bound rejected candidates the free path accepted
    assert sum(gated.rejections.values()) == gated.steps_rejected and gated.rejections.get("trust", 0) >= 1
    assert "trust" not in free.rejections and "trust" not in stats.rejections
    for state in path3:
        m = MLP(8, [12], 4).eval()
        m.load_state_dict(state)
        assert _bound(m, model, gx, gy)[0] <= threshold * (1 + 1e-4)


def _first_order(model64, weights, x, y, delta, losses0=None) -> tuple[float, float]:
    """(<grad f, delta>, ||grad f|| * ||delta||), float64 autograd, of f = the mean cross-entropy on
    (x, y), or with ``losses0`` (per-sample losses at the start) the sample variance of the
    per-sample changes ``d_i = l_i - losses0_i``."""
    m = MLP(8, [12], 4).double().eval()
    m.load_state_dict(weights)
    losses = F.cross_entropy(m(x.double()), y, reduction="none")
    f = losses.mean() if losses0 is None else (losses - losses0).var(correction=1)
    grads = dict(zip([k for k, _ in m.named_parameters()], torch.autograd.grad(f, list(m.parameters()))))
    dot = sum(float((grads[k] * delta[k]).sum()) for k in delta)
    gn = math.sqrt(sum(float((grads[k] ** 2).sum()) for k in delta))
    dn = math.sqrt(sum(float((delta[k] ** 2).sum()) for k in delta))
    return dot, gn * dn


@pytest.mark.parametrize("seed", [0, 1])
def test_guard_tangent_step_keeps_guard_and_calibration_loss_constant_to_first_order(seed):
    # tau < 1: approximate null spaces, so both the calibration and the guard loss have a first-order
    # term along a projected step; the guard-tangent step removes both (float64 model: float64 roundoff)
    torch.manual_seed(seed)
    model = MLP(8, [12], 4).double().eval()
    x, y = torch.randn(40, 8, dtype=torch.float64), torch.randint(0, 4, (40,))
    gx, gy = torch.randn(15, 8, dtype=torch.float64), torch.randint(0, 4, (15,))
    with torch.no_grad():
        g0 = F.cross_entropy(model(gx), gy, reduction="none")
    layers0, _ = find_layers(model)
    accs = capture_grams(model, layers0, [(x, y)])
    bases = {s.name: layer_basis(s.name, accs[s.name].gram, 0.9) for s, _ in layers0}
    assert all(0 < b.null_dim for b in bases.values())
    cases = {}
    for mode in ("off", "mean", "bound"):
        moved = MLP(8, [12], 4).double().eval()
        moved.load_state_dict(model.state_dict())
        layers, _ = find_layers(moved)
        path = [{k: v.detach().clone() for k, v in moved.state_dict().items()}]

        def on_step(accepted, record, log):
            if record is not None:
                path.append({k: v.detach().clone() for k, v in moved.state_dict().items()})

        # fixed step length, no cap in reach: each accepted step is exactly scale * the tangent direction
        config = TeleportConfig(tau=0.9, steps=3, step_size=1e-3, step_growth=1.0, max_step=100.0, tolerance=10.0,
                                guard_tangent=mode, device="cpu")
        stats = ascend(moved, [(x, y)], layers, bases, config, CE, on_step=on_step, guard=[(gx, gy)], guard_tolerance=10.0)
        assert stats.steps_accepted == 3 and stats.rejections == {}
        cases[mode] = []
        for before, after in zip(path, path[1:]):
            delta = {k: after[k] - before[k] for k in after}
            cases[mode].append([_first_order(model, before, a, b, delta, l0) for a, b, l0 in ((gx, gy, None), (x, y, None), (gx, gy, g0))])
    for mode in ("mean", "bound"):
        for guard, cal, _ in cases[mode]:
            assert abs(guard[0]) <= 1e-12 * guard[1]  # the guard's mean loss: constant to first order
            assert abs(cal[0]) <= 1e-12 * cal[1]  # the calibration tangent condition still holds
    # bound: the variance of the guard's changes too, once it has one (at the start every d_i is 0)
    assert all(abs(var[0]) <= 1e-12 * var[1] for _, _, var in cases["bound"][1:])
    # without them the guard's mean (off) and variance (mean) move to first order: the test has teeth
    assert all(abs(guard[0]) > 1e-3 * guard[1] and abs(cal[0]) <= 1e-12 * cal[1] for guard, cal, _ in cases["off"])
    assert all(abs(var[0]) > 1e-3 * var[1] for _, _, var in cases["mean"][1:])


def test_per_sample_terms_are_bit_for_bit_those_of_batches_of_one():
    """The guard's per-sample cross-entropies in one call equal each sample's own summed loss
    exactly (so its bound decides as it did sample by sample), on the shipped MLP and float16
    logits; a language model's terms sum to its batch loss."""
    from safetensors.torch import load_file

    from teleport_cli.models.loading import load_model
    from teleport_cli.nullspace.losses import cross_entropy_sum, next_token_cross_entropy_sum, sample_terms

    model = load_model(ROOT / "sample_checkpoints" / "mlp_digits_mid.safetensors")[0].eval()
    data = load_file(str(ROOT / "sample_checkpoints" / "digits_calibration.safetensors"))
    with torch.no_grad():
        logits = model(data["inputs"][:100])
    for lg in (logits, logits.half()):
        one = torch.stack([cross_entropy_sum(lg[i:i + 1], data["targets"][i:i + 1]) for i in range(100)])
        assert torch.equal(sample_terms(cross_entropy_sum, lg, data["targets"][:100]), one)
    lm_logits, tokens = torch.randn(5, 7, 11, dtype=torch.float64), torch.randint(0, 11, (5, 7))
    terms = sample_terms(next_token_cross_entropy_sum, lm_logits, tokens)
    assert terms.shape == (5,) and float(terms.sum()) == pytest.approx(float(next_token_cross_entropy_sum(lm_logits, tokens)), rel=1e-14)
