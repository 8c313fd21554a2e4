"""``teleport inspect``: every row against brute force (numpy's matrix_rank on the explicit
input matrix of each layer, collected by the test's own hooks or by hand)."""

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from teleport_cli.cli import cli
from teleport_cli.models.builtin import MLP


def inspect_json(*args):
    r = CliRunner().invoke(cli, ["inspect", *[str(a) for a in args], "--json", "-q"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def expected_null_dim(x: np.ndarray, tau: float) -> tuple[int, int]:
    """(rank, null dim at tau) of the rows x by brute force: numpy's rank, then the energy rule."""
    rank = int(np.linalg.matrix_rank(x))
    s = np.sort(np.linalg.eigvalsh(x.T @ x).clip(min=0))
    d = x.shape[1]
    if tau >= 1:
        return rank, d - rank
    k = max(j for j in range(d + 1) if s[:j].sum() <= (1 - tau) * s.sum())
    return rank, max(k, d - rank)


@pytest.mark.parametrize("tau", [1.0, 0.99])
def test_mlp_rows_match_brute_force(samples, tmp_path, tau):
    cal = load_file(samples / "digits_calibration.safetensors")
    few = tmp_path / "few.safetensors"
    save_file({"inputs": cal["inputs"][:40].contiguous(), "targets": cal["targets"][:40].contiguous()}, str(few))
    doc = inspect_json(samples / "mlp_digits_mid.safetensors", "--data", few, "--tau", tau, "--device", "cpu")
    model = MLP(64, [128, 64], 10).double()
    model.load_state_dict(load_file(samples / "mlp_digits_mid.safetensors"))
    x0 = cal["inputs"][:40].double()
    x1 = torch.relu(model.hidden[0](x0))
    x2 = torch.relu(model.hidden[1](x1))
    rows = {l["name"]: l for l in doc["layers"]}
    assert doc["samples"] == 40 and doc["tau"] == tau and doc["arch"] == "mlp"
    for name, x in (("hidden.0", x0), ("hidden.1", x1), ("head", x2)):
        rank, null = expected_null_dim(x.detach().numpy(), tau)
        r = rows[name]
        assert (r["kind"], r["d_in"], r["rows"]) == ("linear", x.shape[1], 40)
        assert (r["rank"], r["null_dim"]) == (rank, null), name
        assert r["teleported"] == (null > 0) and (r["reason"] == "") == r["teleported"]


def test_cnn_with_depthwise_convs_rows_match_brute_force(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    ckpt = tmp_path / "eff.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt),
              metadata={"arch": "test_efficientnet", "model_kwargs": json.dumps({"num_classes": 3})})
    x = torch.randn(2, 3, 32, 32)
    data = tmp_path / "cal.safetensors"
    save_file({"inputs": x, "targets": torch.tensor([0, 1])}, str(data))
    doc = inspect_json(ckpt, "--data", data, "--tau", 1, "--device", "cpu")
    rows = {l["name"]: l for l in doc["layers"]}

    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.setdefault(n, (m, a[0])) and None)
             for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    grouped = 0
    for name, (m, inp) in inputs.items():
        r = rows[name]
        if isinstance(m, torch.nn.Linear):
            blocks = [inp.double().reshape(-1, m.in_features)]
        else:  # patches by F.unfold (the tool unfolds with Tensor.unfold), split by group
            cols = F.unfold(inp.double(), m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            blocks = list(cols.reshape(cols.shape[0], m.groups, -1).transpose(0, 1))
            grouped += m.groups > 1
        ranks = [int(np.linalg.matrix_rank(b.numpy())) for b in blocks]
        assert r["groups"] == len(blocks) and r["d_in"] == blocks[0].shape[1], name
        assert r["rank"] == sum(ranks), name
        assert r["null_dim"] == sum(b.shape[1] for b in blocks) - sum(ranks), name
    assert grouped >= 2  # depthwise convs were covered
    norms = [l for l in doc["layers"] if l["kind"] == "norm"]
    assert norms and all(not l["teleported"] and "normalisation" in l["reason"] for l in norms)
    assert doc["teleportable"] == sum(l["teleported"] for l in doc["layers"]) > 0


def test_stdout_is_only_the_result_and_bad_data_is_exit_3(samples, tmp_path):
    r = CliRunner().invoke(cli, ["inspect", str(samples / "mlp_digits_mid.safetensors"), "--data",
                                 str(samples / "digits_calibration.safetensors"), "--tau", "0.99"])
    assert r.exit_code == 0 and r.stdout.strip() == "3/3"
    bad = tmp_path / "bad.safetensors"
    save_file({"inputs": torch.randn(5, 32), "targets": torch.zeros(5, dtype=torch.int64)}, str(bad))
    r = CliRunner().invoke(cli, ["inspect", str(samples / "mlp_digits_mid.safetensors"), "--data", str(bad)])
    assert r.exit_code == 3 and "do not fit the model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
