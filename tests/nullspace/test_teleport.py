"""The ascent loop and its objective against independent computations."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _explicit import flat_loss

from teleport_cli import TeleportConfig, teleport
from teleport_cli.data.tensors import load_tensor_data
from teleport_cli.models.builtin import MLP
from teleport_cli.models.loading import load_model
from teleport_cli.nullspace.derivatives import full_gradient, hessian_vector_product
from teleport_cli.nullspace.losses import cross_entropy_sum


@pytest.fixture
def mid_model(samples):
    model = load_model(samples / "mlp_digits_mid.safetensors")[0]
    return model


def test_tau1_few_samples_keeps_calibration_logits_after_multi_step_teleport(mid_model, samples):
    cal = load_tensor_data(samples / "digits_calibration.safetensors")
    few = cal.subset(torch.arange(24))  # 24 samples < d_in of every layer (64, 128, 64)
    hold = load_tensor_data(samples / "digits_holdout.safetensors")
    # no guard: this checks the exact null spaces of all 24 samples (the guard would keep some out)
    config = TeleportConfig(tau=1.0, steps=10, step_size=0.05, max_step=1.0, holdout_tolerance=10.0, guard_fraction=0.0)
    out = teleport(mid_model, few, config, holdout=hold)
    assert out.stats.steps_accepted == 10
    with torch.no_grad():
        before, after = mid_model(few.inputs), out.model(few.inputs)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    # The later layers moved for real. With exact null spaces the first layer cannot change
    # the gradient norm (its inputs, outputs and gradient stay the same), so H g has no
    # component in its null space and it stays put; biases never move.
    moved = {n: ((dict(out.model.named_modules())[n].weight - w0).norm() / w0.norm()).item()
             for n, w0 in ((n, dict(mid_model.named_modules())[n].weight) for n in ("hidden.0", "hidden.1", "head"))}
    assert moved["hidden.1"] > 1e-2 and moved["head"] > 1e-2
    assert moved["hidden.0"] < 1e-6
    for (k, a), (_, b) in zip(mid_model.state_dict().items(), out.model.state_dict().items()):
        if k.endswith("bias"):
            assert torch.equal(a, b)
    assert out.stats.grad_norm_after > out.stats.grad_norm_before


def test_objective_gradient_is_explicit_hessian_times_full_gradient_for_any_batching():
    torch.manual_seed(1)
    model = MLP(6, [5], 3).double()
    x = torch.randn(23, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (23,))
    params = list(model.parameters())
    wrt = [model.hidden[0].weight, model.head.weight]

    loss, theta, names, sizes = flat_loss(model, x, y)
    h = torch.autograd.functional.hessian(loss, theta)
    g = torch.autograd.functional.jacobian(loss, theta)
    hg = (h @ g).split(sizes)
    expected = {n: t for n, t in zip(names, hg)}

    results = []
    for bs in (23, 7, 1):
        batches = [(x[i : i + bs], y[i : i + bs]) for i in range(0, 23, bs)]
        state = full_gradient(model, batches, cross_entropy_sum, params, 23)
        assert state.grad_norm == pytest.approx(g.norm().item(), rel=1e-12)
        assert state.loss == pytest.approx(loss(theta).item(), rel=1e-12)
        hv = hessian_vector_product(model, batches, cross_entropy_sum, params, state.grads, wrt, 23)
        assert torch.allclose(hv[0].reshape(-1), expected["hidden.0.weight"], rtol=1e-10, atol=1e-12)
        assert torch.allclose(hv[1].reshape(-1), expected["head.weight"], rtol=1e-10, atol=1e-12)
        results.append(hv)
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("objective, ratio", [("grad-norm", 1.5), ("lookahead", 1.2)])
def test_default_teleport_of_mid_checkpoint_raises_gradient_norm_within_drift(mid_model, samples, objective, ratio):
    """The paper's objective at the default settings raises the gradient norm at least 1.5x (the
    core issue's target); the default look-ahead objective trades some of it for lower curvature."""
    cal = load_tensor_data(samples / "digits_calibration.safetensors")
    hold = load_tensor_data(samples / "digits_holdout.safetensors")
    out = teleport(mid_model, cal, TeleportConfig(objective=objective), holdout=hold)
    assert out.verified
    # recompute everything independently in float64
    m0, m1 = copy.deepcopy(mid_model).double(), copy.deepcopy(out.model).double()
    x, y = cal.inputs.double(), cal.targets

    def grad_norm(m):
        loss = F.cross_entropy(m(x), y)
        gs = torch.autograd.grad(loss, list(m.parameters()))
        return loss.item(), torch.sqrt(sum((t**2).sum() for t in gs)).item()

    l0, g0 = grad_norm(m0)
    l1, g1 = grad_norm(m1)
    assert g1 / g0 >= ratio
    assert abs(l1 - l0) / l0 < 1e-2
    assert out.stats.grad_norm_before == pytest.approx(g0, rel=1e-4)
    # float32 against float64: the teleported point has gradients that sum many larger
    # per-sample terms, so the float32 figure is good to about 0.2% there (measured), not 1e-4
    assert out.stats.grad_norm_after == pytest.approx(g1, rel=1e-2)
    with torch.no_grad():
        hl0 = F.cross_entropy(m0(hold.inputs.double()), hold.targets).item()
        hl1 = F.cross_entropy(m1(hold.inputs.double()), hold.targets).item()
    assert out.verification.holdout.loss_before == pytest.approx(hl0, rel=1e-5)
    assert out.verification.holdout.loss_after == pytest.approx(hl1, rel=1e-5)


def test_max_step_caps_each_layers_relative_change(mid_model, samples):
    cal = load_tensor_data(samples / "digits_calibration.safetensors")
    out = teleport(mid_model, cal, TeleportConfig(max_step=0.01, steps=20, step_size=0.05, holdout_tolerance=1.0))
    assert out.stats.steps_accepted > 0
    for layer in out.layers:
        w0 = dict(mid_model.named_modules())[layer.name].weight
        w1 = dict(out.model.named_modules())[layer.name].weight
        rel = ((w1 - w0).norm() / w0.norm()).item()
        assert rel <= 0.01 * (1 + 1e-5)
        assert rel == pytest.approx(layer.rel_weight_change, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("growth", [1.0, 2.0])
def test_step_length_grows_after_first_try_acceptances_and_halves_on_rejections(mid_model, samples, growth):
    """The recorded step lengths follow the rule: the first trial of step i+1 is
    min(growth * eta_i, max_step) if step i was accepted at its first try, else eta_i; each
    rejection halves it. Every accepted point stays within the drift bound (float64 check)."""
    cal = load_tensor_data(samples / "digits_calibration.safetensors")
    config = TeleportConfig(objective="grad-norm", steps=30, step_growth=growth, max_step=0.5, holdout_tolerance=1.0)
    out = teleport(mid_model, cal, config)
    hist = out.stats.history
    assert len(hist) >= 5
    trial = config.step_size
    for rec in hist:
        assert rec.step_size == pytest.approx(trial * 0.5 ** rec.backtracks, rel=1e-12)
        trial = min(rec.step_size * growth, config.max_step) if rec.backtracks == 0 else rec.step_size
    if growth > 1:
        assert max(r.step_size for r in hist) > config.step_size  # it did grow
    else:
        assert max(r.step_size for r in hist) == config.step_size
    m0, m1 = copy.deepcopy(mid_model).double(), copy.deepcopy(out.model).double()
    cal_in = cal.subset(torch.tensor(sorted(set(range(len(cal))) - set(out.holdout_indices))))
    with torch.no_grad():
        l0 = F.cross_entropy(m0(cal_in.inputs.double()), cal_in.targets).item()
        l1 = F.cross_entropy(m1(cal_in.inputs.double()), cal_in.targets).item()
    assert abs(l1 - l0) <= config.tolerance * l0 + 1e-6 + out.verification.noise_floor + 1e-6


def test_library_leaves_the_original_model_and_its_mode_untouched(mid_model, samples):
    cal = load_tensor_data(samples / "digits_calibration.safetensors")
    before = {k: v.clone() for k, v in mid_model.state_dict().items()}
    mid_model.train()
    teleport(mid_model, (cal.inputs, cal.targets), TeleportConfig(steps=3))
    assert mid_model.training
    assert all(torch.equal(before[k], v) for k, v in mid_model.state_dict().items())


def test_exact_null_space_on_many_samples_gives_no_freedom(mid_model, samples):
    """tau = 1 with more samples than d_in: only dead directions are null, where H g vanishes."""
    cal = load_tensor_data(samples / "digits_calibration.safetensors")
    out = teleport(mid_model, cal, TeleportConfig(tau=1.0, steps=5))
    assert out.stats.steps_accepted == 0
    assert out.stats.stop_reason == "no_freedom"
