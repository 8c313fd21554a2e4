"""Half-precision storage: dtypes preserved, verification again after the cast, rounding floor."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _ckpt import MOVABLE, identical, loss64, mid_metadata, mid_state, run
from safetensors.torch import load_file, save_file

from teleport_cli.config import TeleportConfig
from teleport_cli.data.tensors import TensorData
from teleport_cli.models.builtin import MLP
from teleport_cli.nullspace.storage_dtype import verify_storage


@pytest.mark.parametrize(
    "case",
    ["float16", "bfloat16", "mixed"],  # mixed: weights float16, biases float32
)
def test_storage_dtype_is_kept_and_verified_after_the_cast(tmp_path, case):
    state = mid_state()
    if case == "mixed":
        state = {k: v.half() if k.endswith("weight") else v for k, v in state.items()}
    else:
        state = {k: v.to(getattr(torch, case)) for k, v in state.items()}
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(state, str(src), metadata=mid_metadata())
    result = run(src, out)
    after = load_file(str(out))
    for k, v in state.items():
        assert after[k].dtype == v.dtype, k
        assert (not torch.equal(after[k], v)) if k in MOVABLE else identical(after[k], v), k
    st = result.files["storage"]
    assert st["cast"] is True and st["passed"] is True
    assert st["dtypes"] == (["bfloat16"] if case == "bfloat16" else ["float16"])
    cal = st["calibration"]
    # both verifications are reported: in float32 (the teleport) and of the file as written; each
    # ascent step was checked after rounding to the stored dtype, so the two are of the same weights
    doc = result.to_dict()
    assert doc["checkpoint"]["storage"] is st and doc["calibration"]["passed"] and doc["holdout"]["passed"]
    assert doc["calibration"]["loss_after"] == pytest.approx(cal["loss_after_cast"], rel=1e-6)
    assert cal["loss_after_cast"] == pytest.approx(loss64(after), rel=1e-5)
    assert cal["loss_before"] == pytest.approx(loss64(state), rel=1e-5)
    assert st["max_abs_rounding"] == 0.0 and cal["rounding_floor_loss"] == 0.0
    assert abs(cal["loss_after_cast"] - cal["loss_before"]) <= 5e-3 * cal["loss_before"] + 1e-6 + cal["rounding_floor_loss"] + 1e-6


def test_float32_storage_needs_no_cast(tmp_path):
    result = run(_copy_mid(tmp_path), tmp_path / "out.safetensors")
    assert result.files["storage"] == {"cast": False, "dtypes": ["float32"], "passed": True}


def _copy_mid(tmp_path):
    src = tmp_path / "in.safetensors"
    save_file(mid_state(), str(src), metadata=mid_metadata())
    return src


def _ce64(model: MLP, weights: dict, x, y) -> tuple[float, torch.Tensor]:
    m = MLP(6, [5], 3).double()
    m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        for k, v in weights.items():
            m.get_parameter(k).copy_(v.double())
        logits = m(x.double())
    return F.cross_entropy(logits, y).item(), logits


def test_rounding_floor_is_the_same_rounding_applied_to_the_original_weights():
    """An exact null-space move (tau = 1): float32 outputs do not change, float16 rounding does."""
    torch.manual_seed(4)
    original = MLP(6, [5], 3).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.copy_(p.half().float())  # the stored float16 values, loaded exactly
    x, y = torch.randn(3, 6), torch.tensor([0, 1, 2])
    hx, hy = torch.randn(7, 6), torch.randint(0, 3, (7,))
    w0 = original.hidden[0].weight.detach()
    null = torch.linalg.svd(x.double(), full_matrices=True).Vh[3:].float()  # rows orthogonal to every sample
    w1 = w0 + 0.3 * torch.randn(5, 3) @ null
    teleported = MLP(6, [5], 3).eval()
    teleported.load_state_dict(original.state_dict())
    with torch.no_grad():
        teleported.hidden[0].weight.copy_(w1)
    stored = {"hidden.0.weight": w1.half()}
    cfg = TeleportConfig(device="cpu")
    out = verify_storage(original, teleported, stored, TensorData(x, y), TensorData(hx, hy), cfg, 0.0)

    r = w1.half().double() - w1.double()
    assert out["cast"] and out["max_abs_rounding"] == pytest.approx(r.abs().max().item(), rel=1e-6)
    for name, (xs, ys) in (("calibration", (x, y)), ("holdout", (hx, hy))):
        l0, z0 = _ce64(original, {}, xs, ys)
        lc, zc = _ce64(original, {"hidden.0.weight": w1.half()}, xs, ys)
        lf, zf = _ce64(original, {"hidden.0.weight": w0.double() + r}, xs, ys)
        c = out[name]
        assert c["loss_before"] == pytest.approx(l0, rel=1e-6)
        assert c["loss_after_cast"] == pytest.approx(lc, rel=1e-6)
        assert c["max_abs_logit_diff"] == pytest.approx((zc - z0).abs().max().item(), rel=1e-2, abs=1e-6)
        assert c["rounding_floor_loss"] == pytest.approx(abs(lf - l0), abs=2e-6)
        assert c["rounding_floor_max_abs_logit_diff"] == pytest.approx((zf - z0).abs().max().item(), rel=1e-2, abs=1e-6)
    # on the calibration set the float32 move is exact, so after the cast only rounding is left
    assert out["calibration"]["max_abs_logit_diff"] > 0
    assert out["calibration"]["max_abs_logit_diff"] < 10 * 2**-10 * float(w1.abs().max()) * float(x.abs().sum(1).max())


def test_a_cast_that_fails_verification_is_exit_4_and_writes_nothing(tmp_path, monkeypatch):
    """The held-out loss of an exact calibration-set move changes; with a zero held-out
    tolerance the cast check fails (computed, not mocked), and the pipeline refuses to write."""
    import teleport_cli.pipeline as pipeline
    from teleport_cli.nullspace.storage_dtype import storage_failure

    torch.manual_seed(4)
    original = MLP(6, [5], 3).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.copy_(p.half().float())
    x, y = torch.randn(3, 6), torch.tensor([0, 1, 2])
    hx, hy = torch.randn(7, 6), torch.randint(0, 3, (7,))
    null = torch.linalg.svd(x.double(), full_matrices=True).Vh[3:].float()
    teleported = MLP(6, [5], 3).eval()
    teleported.load_state_dict(original.state_dict())
    with torch.no_grad():
        teleported.hidden[0].weight.add_(0.3 * torch.randn(5, 3) @ null)
    stored = {"hidden.0.weight": teleported.hidden[0].weight.detach().half()}
    cfg = TeleportConfig(device="cpu", holdout_tolerance=0.0)
    out = verify_storage(original, teleported, stored, TensorData(x, y), TensorData(hx, hy), cfg, 0.0)
    assert out["calibration"]["passed"] and not out["holdout"]["passed"] and not out["passed"]
    err = storage_failure(out)
    assert err.exit_code == 4 and "after casting back to float16 failed: holdout loss" in err.one_line()

    # the pipeline raises it before writing anything
    monkeypatch.setattr(pipeline, "verify_storage", lambda *a, **k: out)
    src = _copy_mid(tmp_path)
    with pytest.raises(type(err)) as e:
        run(src, tmp_path / "out.safetensors")
    assert e.value.result.files["storage"] is out and sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_float16_resnet_teleports_verifies_after_the_cast_and_stays_float16(tmp_path):
    """The shipped mid-training test_resnet (BatchNorm) stored in float16, teleported by the CLI at
    defaults: every step is checked after rounding, the cast check runs in eval mode, exit 0, every
    stored tensor keeps its dtype, and the JSON's losses are those of the file as written
    (recomputed here in float32 from the written tensors, outside the pipeline)."""
    from click.testing import CliRunner
    from safetensors import safe_open

    from teleport_cli.cli import cli
    from teleport_cli.data.sources import load_data
    from teleport_cli.models.loading import load_model

    samples = Path(__file__).resolve().parents[2] / "sample_checkpoints"
    src_file = samples / "fmnist_test_resnet_mid.safetensors"
    with safe_open(str(src_file), "pt") as f:
        meta = dict(f.metadata())
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(src_file)).items()}
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    src, out = tmp_path / "r16.safetensors", tmp_path / "out.safetensors"
    save_file(state, str(src), metadata=meta)
    cal, hold = samples / "fmnist_calibration", samples / "fmnist_holdout"
    r = CliRunner().invoke(cli, ["apply", str(src), "--data", str(cal), "--holdout", str(hold), "-o", str(out), "--json", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["verified"] is True and doc["steps_accepted"] >= 1
    storage = doc["checkpoint"]["storage"]
    assert storage["cast"] is True and storage["passed"] is True and storage["dtypes"] == ["float16"]
    after = load_file(str(out))
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert after[k].dtype == v.dtype, k
    assert any(not torch.equal(after[k], state[k]) for k in state)
    # the file as written, in float32, in eval mode: its losses are the JSON's
    model = load_model(src)[0]
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in after.items()})
    model = model.float().eval()
    original = load_model(src)[0].float().eval()
    for name, folder in (("calibration", cal), ("holdout", hold)):
        data = load_data(folder, json.loads(meta["data_config"]), model).data
        with torch.no_grad():
            l1 = F.cross_entropy(model(data.inputs.float()), data.targets).item()
            l0 = F.cross_entropy(original(data.inputs.float()), data.targets).item()
        assert doc[name]["samples"] == len(data)
        assert storage[name]["loss_after_cast"] == pytest.approx(l1, rel=1e-5)
        assert doc[name]["loss_after"] == pytest.approx(l1, rel=1e-5)  # the steps were rounded: nothing left to cast
        assert doc[name]["loss_before"] == pytest.approx(l0, rel=1e-5)
        assert abs(l1 - l0) <= doc[name]["tolerance"] * l0 + 1e-5
