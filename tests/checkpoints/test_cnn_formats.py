"""Hugging Face folders from timm's save_for_hf, BatchNorm buffers, channels_last, tied tensors."""

import filecmp
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from _ckpt import identical
from safetensors.torch import load_file, load_model, save_file, save_model
from timm.models import save_for_hf
from torch import nn

from teleport_cli.checkpoints.single import write_safetensors
from teleport_cli.config import TeleportConfig
from teleport_cli.pipeline import apply

CFG = TeleportConfig(steps=3, device="cpu", step_growth=1.0)  # fixed steps: these tests are about what is written


def _data(tmp_path, shape, n_cal, n_hold, classes=3):
    torch.manual_seed(1)
    x, y = torch.randn(n_cal + n_hold, *shape), torch.randint(0, classes, (n_cal + n_hold,))
    cal, hold = tmp_path / "cal.safetensors", tmp_path / "hold.safetensors"
    save_file({"inputs": x[:n_cal].contiguous(), "targets": y[:n_cal].contiguous()}, str(cal))
    save_file({"inputs": x[n_cal:].contiguous(), "targets": y[n_cal:].contiguous()}, str(hold))
    return cal, hold, x[:n_cal], y[:n_cal]


def _loss64(model: nn.Module, state: dict, x, y) -> float:
    m = model.double().eval()
    m.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    with torch.no_grad():
        return F.cross_entropy(m(x.double()), y).item()


@pytest.mark.parametrize("serialization", ["both", False])  # False: pytorch_model.bin only (save_for_hf's default)
def test_hf_folder_from_timm_save_for_hf_keeps_its_files_and_buffers(tmp_path, serialization):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3, in_chans=1)
    for name, buf in model.named_buffers():  # trained-looking running statistics
        if "running" in name:
            buf.copy_(torch.rand_like(buf) * 0.1 + (1.0 if "var" in name else 0.0))
    save_for_hf(model, tmp_path / "in", safe_serialization=serialization)
    (tmp_path / "in" / "README.md").write_text("card\n")
    cal, hold, x, y = _data(tmp_path, (1, 32, 32), 24, 16)
    result = apply(tmp_path / "in", cal, tmp_path / "out", CFG, holdout=hold)

    out = tmp_path / "out"
    weights = ["model.safetensors", "pytorch_model.bin"] if serialization == "both" else ["pytorch_model.bin"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "config.json", *weights])
    assert filecmp.cmp(out / "config.json", tmp_path / "in" / "config.json", shallow=False)
    before = torch.load(tmp_path / "in" / "pytorch_model.bin", weights_only=True)
    after = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert list(after) == list(before)
    if serialization == "both":
        safe = load_file(str(out / "model.safetensors"))
        assert set(safe) == set(after) and all(identical(safe[k], after[k]) for k in after)
    moved = {f"{l.name}.weight" for l in result.outcome.layers if l.teleported}
    assert moved and result.outcome.stats.steps_accepted > 0
    buffers = [k for k in before if "running" in k or "num_batches_tracked" in k]
    assert len(buffers) > 10 and all(identical(after[k], before[k]) for k in buffers)
    assert all(identical(after[k], before[k]) for k in before if k not in moved)
    assert all(not torch.equal(after[k], before[k]) for k in moved)
    fresh = timm.create_model("test_resnet", pretrained=False, num_classes=3, in_chans=1)
    assert _loss64(fresh, after, x, y) == pytest.approx(result.outcome.verification.calibration.loss_after, rel=1e-5)
    assert result.files["container"] == "hf" and result.arch == "test_resnet"


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2)
        self.head = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def test_channels_last_tensors_are_written_with_their_layout_and_values(tmp_path):
    torch.manual_seed(2)
    model = TinyCNN().to(memory_format=torch.channels_last)
    sd = model.state_dict()
    assert not sd["conv1.weight"].is_contiguous() and sd["conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    torch.save(sd, tmp_path / "in.pt")
    cal, hold, x, y = _data(tmp_path, (2, 8, 8), 6, 10)
    result = apply(tmp_path / "in.pt", cal, tmp_path / "out.pt", CFG, holdout=hold, module=TinyCNN())
    after = torch.load(tmp_path / "out.pt", weights_only=True)
    for k in ("conv1.weight", "conv2.weight"):
        assert after[k].stride() == sd[k].stride(), k
    assert _loss64(TinyCNN(), after, x, y) == pytest.approx(result.outcome.verification.calibration.loss_after, rel=1e-5)
    # safetensors stores logical values: a channels_last tensor round-trips
    write_safetensors(tmp_path / "cl.safetensors", {"w": sd["conv1.weight"]}, {})
    assert torch.equal(load_file(str(tmp_path / "cl.safetensors"))["w"], sd["conv1.weight"])


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tied_tensors_stay_tied_in_pickles_and_in_deduplicated_safetensors(tmp_path):
    torch.manual_seed(3)
    model = TiedNet()
    cal, hold, x, y = _data(tmp_path, (8,), 5, 10)
    torch.save(model.state_dict(), tmp_path / "in.pt")
    result = apply(tmp_path / "in.pt", cal, tmp_path / "out.pt", CFG, holdout=hold, module=TiedNet())
    after = torch.load(tmp_path / "out.pt", weights_only=True)
    assert after["a.weight"].untyped_storage().data_ptr() == after["b.weight"].untyped_storage().data_ptr()
    assert identical(after["a.weight"], model.a.weight.detach())
    assert {l.name: l.reason for l in result.outcome.layers if not l.teleported}.keys() >= {"a", "b"}
    assert not torch.equal(after["head.weight"], model.head.weight.detach())

    save_model(model, str(tmp_path / "in.safetensors"))  # stores the tied weight once
    stored = set(load_file(str(tmp_path / "in.safetensors")))
    assert len(stored) == len(model.state_dict()) - 1
    apply(tmp_path / "in.safetensors", cal, tmp_path / "out.safetensors", CFG, holdout=hold, module=TiedNet())
    assert set(load_file(str(tmp_path / "out.safetensors"))) == stored
    back = TiedNet()
    load_model(back, str(tmp_path / "out.safetensors"))
    assert back.b.weight is back.a.weight and torch.equal(back.a.weight, model.a.weight)


def test_hf_folder_with_sharded_safetensors(tmp_path):
    """A Hugging Face folder whose weights are sharded: config.json kept, shards rewritten."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3, in_chans=1)
    save_for_hf(model, tmp_path / "in", safe_serialization=True)
    single = tmp_path / "in" / "model.safetensors"
    sd = load_file(str(single))
    single.unlink()
    keys = list(sd)
    weight_map = {k: ("model-00001-of-00002.safetensors" if i < len(keys) // 2 else "model-00002-of-00002.safetensors") for i, k in enumerate(keys)}
    for f in set(weight_map.values()):
        save_file({k: sd[k] for k in keys if weight_map[k] == f}, str(tmp_path / "in" / f))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "in" / "model.safetensors.index.json").write_text(json.dumps(index))
    cal, hold, x, y = _data(tmp_path, (1, 32, 32), 24, 16)
    result = apply(tmp_path / "in", cal, tmp_path / "out", CFG, holdout=hold)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors.index.json", *set(weight_map.values())])
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == weight_map
    after = {k: v for f in set(weight_map.values()) for k, v in load_file(str(out / f)).items()}
    moved = {f"{l.name}.weight" for l in result.outcome.layers if l.teleported}
    assert moved and all(identical(after[k], sd[k]) for k in sd if k not in moved)
    fresh = timm.create_model("test_resnet", pretrained=False, num_classes=3, in_chans=1)
    assert _loss64(fresh, after, x, y) == pytest.approx(result.outcome.verification.calibration.loss_after, rel=1e-5)


class AttnNet(nn.Module):
    """Self-attention over 3 tokens, mean-pooled, then a head: in_proj_weight is a bare parameter."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_attention_weights_moved_by_the_teleport_are_the_ones_written(tmp_path):
    """Every tensor that moved is written (in_proj_weight and out_proj.weight included), and
    the written file reproduces the verified loss."""
    torch.manual_seed(5)
    model = AttnNet()
    torch.save(model.state_dict(), tmp_path / "in.pt")
    cal, hold, x, y = _data(tmp_path, (3, 8), 2, 10)
    result = apply(tmp_path / "in.pt", cal, tmp_path / "out.pt", CFG, holdout=hold, module=AttnNet())
    before, after = model.state_dict(), torch.load(tmp_path / "out.pt", weights_only=True)
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert "attn.in_proj_weight" in changed and changed <= {"attn.in_proj_weight", "attn.out_proj.weight", "head.weight"}
    assert result.files["storage"]["cast"] is False
    m = AttnNet().double().eval()
    m.load_state_dict({k: v.double() for k, v in after.items()})
    with torch.no_grad():
        loss = F.cross_entropy(m(x.double()), y).item()
    assert loss == pytest.approx(result.outcome.verification.calibration.loss_after, rel=1e-5)
