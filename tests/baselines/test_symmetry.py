"""Symmetry teleportation (Zhao et al. 2022): the action's exactness, its gradient, a real run."""

import copy

import pytest
import torch
import torch.nn.functional as F

from teleport_cli.baselines.symmetry import act, objective, symmetry_teleport
from teleport_cli.config import TeleportConfig
from teleport_cli.data.tensors import load_tensor_data
from teleport_cli.errors import ConfigError
from teleport_cli.models.builtin import MLP
from teleport_cli.models.loading import load_model
from teleport_cli.nullspace.losses import LOSS_FUNCTIONS


def _explicit_forward(p: dict, x: torch.Tensor, layers: int) -> torch.Tensor:
    h = x
    for i in range(layers):
        h = torch.relu(h @ p[f"hidden.{i}.weight"].T + p[f"hidden.{i}.bias"])
    return h @ p["head.weight"].T + p["head.bias"]


def _tiny(hidden=(8, 5)) -> MLP:
    torch.manual_seed(3)
    model = MLP(6, list(hidden), 3).double()
    with torch.no_grad():  # positive biases: no dead units on the batch, so sigma(Z) has full column rank
        for layer in model.hidden:
            layer.bias.add_(0.5)
    return model


@pytest.mark.parametrize("n", [1, 3, 5])
def test_action_leaves_the_batch_logits_unchanged(n):
    model = _tiny()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    ts = [0.3 * torch.randn(k, k, generator=g, dtype=torch.float64) for k in (8, 5)]
    moved = act(model, params, ts, x)
    before = _explicit_forward(params, x, 2)
    after = _explicit_forward(moved, x, 2)
    assert (after - before).abs().max() < 1e-8
    # the weights did move: g_0 W_0 is not W_0
    assert (moved["hidden.0.weight"] - torch.mm(torch.eye(8, dtype=torch.float64) + ts[0], params["hidden.0.weight"])).abs().max() < 1e-12
    assert (moved["head.weight"] - params["head.weight"]).abs().max() > 1e-3
    # g = I is the identity
    ident = act(model, params, [torch.zeros(k, k, dtype=torch.float64) for k in (8, 5)], x)
    assert all((ident[k] - params[k]).abs().max() < 1e-10 for k in params)


def test_square_batch_is_the_papers_action():
    """n = k: W_{i+1}' = W_{i+1} sigma(Z) sigma(gZ)^{-1} (Zhao et al., Sec. 4), solved independently."""
    model = _tiny((5, 5))
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    ts = [0.2 * torch.randn(5, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    moved = act(model, params, ts, x)
    h, w_cur = x, params["hidden.0.weight"]  # layer i's weight before g_i: W_i moved by layer i-1's action
    for i, nxt in enumerate(["hidden.1.weight", "head.weight"]):
        gi = torch.eye(5, dtype=torch.float64) + ts[i]
        z = (h @ w_cur.T + params[f"hidden.{i}.bias"]).T  # (k, n), layer i's new input
        s, s_new = torch.relu(z), torch.relu(gi @ z)
        expected = torch.linalg.solve(s_new.T, (params[nxt] @ s).T).T  # W S S'^{-1}
        if nxt == "head.weight":
            assert torch.allclose(moved[nxt], expected, atol=1e-9)
        else:
            assert torch.allclose(moved[nxt], (torch.eye(5, dtype=torch.float64) + ts[i + 1]) @ expected, atol=1e-9)
        h, w_cur = s_new.T, expected


def test_objective_gradient_matches_finite_differences():
    model = _tiny()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(11)
    xs = torch.randn(10, 6, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (10,), generator=g)
    batches = [(xs[:6], ys[:6]), (xs[6:], ys[6:])]
    x_act = xs[:4]
    loss_fn = LOSS_FUNCTIONS["ce"]
    t0 = [0.05 * torch.randn(k, k, generator=g, dtype=torch.float64) for k in (8, 5)]
    ts = [t.clone().requires_grad_() for t in t0]
    grads = torch.autograd.grad(objective(model, params, ts, x_act, batches, loss_fn, 10), ts)
    eps = 1e-6
    for layer, (t, gr) in enumerate(zip(t0, grads)):
        fd = torch.zeros_like(t)
        for idx in range(t.numel()):
            vals = []
            for sign in (1, -1):
                moved = [u.clone() for u in t0]
                moved[layer].view(-1)[idx] += sign * eps
                vals.append(float(objective(model, params, moved, x_act, batches, loss_fn, 10).detach()))
            fd.view(-1)[idx] = (vals[0] - vals[1]) / (2 * eps)
        assert torch.allclose(gr, fd, rtol=1e-5, atol=1e-9), (layer, (gr - fd).abs().max())


def _mean_loss_and_grad_norm(model, x, y):
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    gs = torch.autograd.grad(loss, params)
    return float(loss.detach()), float(torch.sqrt(sum((gr.double() ** 2).sum() for gr in gs)))


def test_run_on_the_mid_checkpoint_raises_the_gradient_norm_within_tolerance(samples):
    model = load_model(samples / "mlp_digits_mid.safetensors")[0]
    model.eval()
    cal = load_tensor_data(samples / "digits_calibration.safetensors")
    config = TeleportConfig(steps=3)
    moved = copy.deepcopy(model)
    stats = symmetry_teleport(moved, cal.batches(64), config, LOSS_FUNCTIONS["ce"])
    l0, g0 = _mean_loss_and_grad_norm(model, cal.inputs, cal.targets)
    l1, g1 = _mean_loss_and_grad_norm(moved, cal.inputs, cal.targets)
    assert stats.objective == "symmetry" and stats.steps_accepted >= 1
    assert g1 > 1.2 * g0
    assert abs(l1 - l0) <= config.tolerance * abs(l0) + 1e-6
    assert stats.loss_after == pytest.approx(l1, rel=1e-5) and stats.grad_norm_after == pytest.approx(g1, rel=1e-4)
    assert stats.grad_norm_before == pytest.approx(g0, rel=1e-4)


def test_refuses_other_architectures():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    data = [(torch.randn(3, 4), torch.tensor([0, 1, 0]))]
    with pytest.raises(ConfigError, match="needs the built-in mlp architecture"):
        symmetry_teleport(model, data, TeleportConfig(steps=1), LOSS_FUNCTIONS["ce"])


def test_bench_skips_symmetry_on_other_models_with_a_note():
    from teleport_cli.bench.resume import run_bench
    from teleport_cli.bench.settings import BenchSettings
    from teleport_cli.data.tensors import TensorData

    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    settings = BenchSettings(steps=10, seeds=(0,), calibration_samples=32, variants=("original", "symmetry"))
    doc = run_bench(model, data, data, TeleportConfig(steps=2, device="cpu", objective="grad-norm"), settings)
    assert set(doc["variants"]) == {"original"}
    assert "built-in mlp" in doc["skipped"]["symmetry"]
