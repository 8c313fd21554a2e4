"""``teleport report`` end to end against brute-force float64 computations."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _explicit import explicit_hessian
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from teleport_cli.audit import compare as audit_mod
from teleport_cli.audit.compare import ADAPTIVE_NOTE, audit_models, stability
from teleport_cli.audit.settings import AuditSettings
from teleport_cli.cli import cli
from teleport_cli.data.tensors import TensorData
from teleport_cli.models.builtin import MLP

TINY = {"in_features": 64, "hidden": [4], "num_classes": 10}



def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def tiny(tmp_path):
    """A tiny MLP checkpoint A (with metadata) and B = A moved a little, saved WITHOUT metadata
    (a file this tool did not write)."""
    torch.manual_seed(0)
    a = MLP(**TINY)
    save_file(a.state_dict(), str(tmp_path / "a.safetensors"), metadata={"arch": "mlp", "model_kwargs": json.dumps(TINY)})
    state = {k: v.clone() for k, v in a.state_dict().items()}
    state["hidden.0.weight"] += 0.01 * torch.randn_like(state["hidden.0.weight"])
    state["head.weight"] += 0.02 * torch.randn_like(state["head.weight"])
    save_file(state, str(tmp_path / "b.safetensors"))
    return tmp_path / "a.safetensors", tmp_path / "b.safetensors"


def _model64(path):
    m = MLP(**TINY).double()
    m.load_state_dict({k: v.double() for k, v in load_file(path).items()})
    return m


def _null_dim(inputs: np.ndarray, tau: float) -> int:
    """The null-space rule of the README, in numpy: zero eigenvalues, then the smallest up to 1 - tau of the trace."""
    s = np.clip(np.linalg.eigvalsh(inputs.T @ inputs), 0, None)
    zero = s <= len(s) * np.finfo(np.float64).eps * s.max()
    return int((zero | (np.cumsum(s) <= (1 - tau) * s.sum())).sum())


def test_two_checkpoints_every_figure_against_float64_brute_force(tiny, samples):
    a_path, b_path = tiny
    cal, hold = samples / "digits_calibration.safetensors", samples / "digits_holdout.safetensors"
    r = run("report", a_path, b_path, "--data", cal, "--holdout", hold, "--json", "-q", "--probes", "300",
            "--iterations", "60", "--radius", "0.1", "--batch-size", "100", "--tolerance", "0.5", "--holdout-tolerance", "0.5")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    ma, mb = _model64(a_path), _model64(b_path)
    for key, f in (("calibration", cal), ("holdout", hold)):
        d = load_file(f)
        x, y = d["inputs"].double(), d["targets"]
        with torch.no_grad():
            za, zb = ma(x), mb(x)
        c = doc["datasets"][key]
        la, lb = F.cross_entropy(za, y).item(), F.cross_entropy(zb, y).item()
        assert c["loss_a"] == pytest.approx(la, rel=1e-5) and c["loss_b"] == pytest.approx(lb, rel=1e-5)
        assert c["loss_diff"] == pytest.approx(lb - la, rel=1e-3, abs=1e-6)
        assert c["accuracy_a"] == pytest.approx((za.argmax(1) == y).double().mean().item())
        assert c["accuracy_b"] == pytest.approx((zb.argmax(1) == y).double().mean().item())
        assert c["max_abs_logit_diff"] == pytest.approx((za - zb).abs().max().item(), rel=1e-4)
        assert c["mean_abs_logit_diff"] == pytest.approx((za - zb).abs().mean().item(), rel=1e-4)
        assert c["passed"] is (abs(lb - la) <= 0.5 * abs(la) + 1e-6)

    # layers: output drift from the pre-activations computed by hand, weight change, null space of A
    d = load_file(cal)
    x = d["inputs"].double()
    wa, wb = load_file(a_path), load_file(b_path)
    with torch.no_grad():
        pre = {}
        for tag, w in (("a", wa), ("b", wb)):
            w = {k: v.double() for k, v in w.items()}
            h0 = x @ w["hidden.0.weight"].T + w["hidden.0.bias"]
            head = torch.relu(h0) @ w["head.weight"].T + w["head.bias"]
            pre[tag] = {"hidden.0": h0, "head": head}
    layer_inputs = {"hidden.0": x.numpy(), "head": torch.relu(pre["a"]["hidden.0"]).numpy()}
    layers = {l["name"]: l for l in doc["layers"]}
    assert set(layers) == {"hidden.0", "head"}
    for name in ("hidden.0", "head"):
        za, zb = pre["a"][name], pre["b"][name]
        assert layers[name]["output_drift"] == pytest.approx(((zb - za).norm() / za.norm()).item(), rel=1e-4)
        w0, w1 = wa[f"{name}.weight"].double(), wb[f"{name}.weight"].double()
        assert layers[name]["rel_weight_change"] == pytest.approx(((w1 - w0).norm() / w0.norm()).item(), rel=1e-6)
        assert layers[name]["null_dim"] == _null_dim(layer_inputs[name], 0.99)

    # geometry of both checkpoints against their explicit Hessians (310 parameters)
    y = d["targets"]
    for tag, model in (("a", ma), ("b", mb)):
        g = doc["geometry"][tag]
        loss, theta, grad, h = explicit_hessian(model, x, y)
        evals = torch.linalg.eigvalsh(h)
        assert g["parameters"] == 310
        assert g["grad_norm"] == pytest.approx(grad.norm().item(), rel=1e-4)
        assert g["top_eigenvalue"] == pytest.approx(evals[-1].item(), rel=1e-4)
        assert abs(g["trace"] - torch.trace(h).item()) <= 4 * g["trace_stderr"]
        sharp = loss(theta + 0.1 * grad / grad.norm()).item() - loss(theta).item()
        assert g["sharpness"] == pytest.approx(sharp, rel=1e-3, abs=1e-6)
    assert doc["invariance"]["passed"] is True and doc["stability"] is None


def test_invariance_gate_sets_the_exit_code(samples):
    mid, conv = samples / "mlp_digits_mid.safetensors", samples / "mlp_digits_converged.safetensors"
    cal, hold = samples / "digits_calibration.safetensors", samples / "digits_holdout.safetensors"
    common = ["--data", cal, "--holdout", hold, "--json", "-q", "--iterations", "3", "--probes", "2"]
    r = run("report", mid, conv, *common)
    assert r.exit_code == 4, r.output
    doc = json.loads(r.stdout)  # the document still comes out for the pipeline's log
    assert doc["invariance"]["passed"] is False
    assert doc["datasets"]["calibration"]["relative_loss_drift"] > 0.9
    assert "invariance failed" in r.stderr
    # drift about 0.995 (calibration) and 0.933 (held-out): tolerance 1 lets both pass
    r = run("report", mid, conv, *common, "--tolerance", "1", "--holdout-tolerance", "1")
    assert r.exit_code == 0, r.output
    # only the held-out gate fails
    r = run("report", mid, conv, *common, "--tolerance", "1", "--holdout-tolerance", "0.9")
    assert r.exit_code == 4
    doc = json.loads(r.stdout)
    assert doc["datasets"]["calibration"]["passed"] is True and doc["datasets"]["holdout"]["passed"] is False


def test_stability_flag_at_2_over_lr_and_with_momentum(samples):
    mid, cal = samples / "mlp_digits_mid.safetensors", samples / "digits_calibration.safetensors"
    r = run("report", mid, "--data", cal, "--json", "-q", "--lr", "0.3", "--momentum", "0.9")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    lam = doc["geometry"]["a"]["top_eigenvalue"]
    st = doc["stability"]
    assert st["edge"] == pytest.approx(2 * 1.9 / 0.3)
    assert st["a"]["unstable"] is (lam > st["edge"]) and st["note"] == ADAPTIVE_NOTE
    assert doc["datasets"] == {} and doc["invariance"]["passed"] is None and doc["b"] is None
    # the top eigenvalue of the mid checkpoint is about 5.8: lr 1 is beyond 2/lr = 2, lr 0.05 is not
    assert 4 < lam < 8
    assert stability({"a": lam}, 1.0, 0.0)["a"]["unstable"] is True
    assert stability({"a": lam}, 0.05, 0.0)["a"]["unstable"] is False
    edge = 2 * (1 + 0.5) / 0.5  # 6: momentum raises the edge
    assert stability({"a": 5.0}, 0.5, 0.5)["a"]["unstable"] is False and stability({"a": 5.0}, 0.5, 0.0)["a"]["unstable"] is True
    assert stability({"a": 5.0}, 0.5, 0.5)["edge"] == edge


def test_different_architectures_and_bad_paths_are_one_line_errors(tiny, samples, tmp_path):
    mid, cal = samples / "mlp_digits_mid.safetensors", samples / "digits_calibration.safetensors"
    a, _ = tiny
    r = run("report", mid, a, "--data", cal)
    assert r.exit_code == 3 and "different architectures" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("report", mid, "--data", cal, "--html", cal)
    assert r.exit_code == 6 and "input" in r.stderr
    r = run("report", mid, "--data", cal, "--html", tmp_path / "no" / "r.html")
    assert r.exit_code == 6 and "mkdir" in r.stderr
    r = run("report", mid, "--data", cal, "--spectrum-layer", "nope")
    assert r.exit_code == 2 and "hidden.0" in r.stderr
    r = run("report", mid, "--data", cal, "--lr", "0")
    assert r.exit_code == 2 and "--lr" in r.stderr


def test_same_modules_under_different_kwargs_spellings_are_one_architecture(samples, tmp_path):
    """B names `mlp` with no kwargs (the defaults, which are A's widths): the same modules, so it
    is compared; B with other widths is refused before any loading."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    mid, cal = samples / "mlp_digits_mid.safetensors", samples / "digits_calibration.safetensors"
    with safe_open(str(mid), "pt") as f:
        meta = dict(f.metadata())
    implicit = tmp_path / "implicit.safetensors"
    save_file(load_file(str(mid)), str(implicit), metadata={k: v for k, v in meta.items() if k != "model_kwargs"})
    r = run("report", mid, implicit, "--data", cal, "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["datasets"]["calibration"]["loss_diff"] == 0.0
    other = tmp_path / "other.safetensors"
    save_file(load_file(str(mid)), str(other), metadata={**meta, "model_kwargs": json.dumps({"hidden": [128, 32]})})
    r = run("report", mid, other, "--data", cal)
    assert r.exit_code == 3 and "different architectures" in r.stderr


def _conv_pair():
    torch.manual_seed(2)
    a = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(48, 3)).double().eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[0].weight += 0.05 * torch.randn_like(b[0].weight)
    x = torch.randn(20, 2, 4, 4, dtype=torch.float64)
    return a, b, TensorData(x, torch.randint(0, 3, (20,)))


def test_conv_output_drift_and_a_failed_eigendecomposition_is_a_note(monkeypatch):
    a, b, cal = _conv_pair()
    audit = audit_models(a, b, cal, settings=AuditSettings(batch_size=7, iterations=3, probes=2))
    rows = {l["name"]: l for l in audit.doc["layers"]}
    with torch.no_grad():
        za, zb = a[0](cal.inputs), b[0](cal.inputs)
        ha, hb = a[:3](cal.inputs), b[:3](cal.inputs)
        ya, yb = a[3](ha), b[3](hb)
    assert rows["0"]["output_drift"] == pytest.approx(((zb - za).norm() / za.norm()).item(), rel=1e-9)
    assert rows["3"]["output_drift"] == pytest.approx(((yb - ya).norm() / ya.norm()).item(), rel=1e-9)
    assert rows["3"]["rel_weight_change"] == 0.0
    real = audit_mod.layer_basis

    def flaky(name, gram, tau):
        if name == "3":
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(name, gram, tau)

    monkeypatch.setattr(audit_mod, "layer_basis", flaky)
    audit = audit_models(a, b, cal, settings=AuditSettings(batch_size=7, iterations=3, probes=2))
    rows = {l["name"]: l for l in audit.doc["layers"]}
    assert rows["3"]["null_dim"] is None and "eigendecomposition failed" in rows["3"]["note"]
    assert rows["0"]["null_dim"] is not None and audit.passed is not None
