"""A pre-norm transformer block (LayerNorm -> attention -> residual -> LayerNorm -> MLP) built
from nn.TransformerEncoderLayer, teleported at tau = 1 on a few tokens; and the noise floor
between its fast path (eval, no hooks) and the hooked path the capture runs."""

import copy

import pytest
import torch
from torch import nn

from teleport_cli import TeleportConfig, teleport
from teleport_cli.nullspace.selection import find_layers


class PreNormClassifier(nn.Module):
    def __init__(self, d_in=4, d=16, classes=3):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.block = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.block(self.embed(x)).mean(1))


def test_prenorm_block_teleport_keeps_calibration_logits_and_moves_weights():
    model = PreNormClassifier().eval()
    x = torch.randn(2, 3, 4)  # 6 token rows < d_in 16 of every projection: exact null spaces
    y = torch.tensor([0, 2])
    hold = (torch.randn(4, 3, 4), torch.randint(0, 3, (4,)))
    names = [s.name for s, _ in find_layers(model)[0]]
    assert names == ["embed", "block.self_attn.in_proj", "block.self_attn.out_proj", "block.linear1", "block.linear2", "head"]
    config = TeleportConfig(tau=1.0, steps=3, step_size=0.02, tolerance=1e-5, holdout_tolerance=1e9, device="cpu")
    out = teleport(model, (x, y), config, holdout=hold)
    assert out.stats.steps_accepted == 3
    assert out.stats.grad_norm_after > 1.2 * out.stats.grad_norm_before
    # independent check in float64 with grad enabled (the slow path, from the definition)
    m0, m1 = copy.deepcopy(model).double(), copy.deepcopy(out.model).double()
    a, b = m0(x.double()), m1(x.double())
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    moved = {l.name: l.rel_weight_change for l in out.layers if l.teleported}
    for name in ("block.self_attn.in_proj", "block.self_attn.out_proj", "block.linear1", "block.linear2", "head"):
        w0 = model.get_parameter(find_layers(model)[0][names.index(name)][0].weight_key)
        w1 = out.model.get_parameter(find_layers(out.model)[0][names.index(name)][0].weight_key)
        assert ((w1 - w0).norm() / w0.norm()).item() == pytest.approx(moved[name], rel=1e-4)
        assert moved[name] > 1e-3
    # off the calibration set the function changed
    xh = hold[0].double()
    assert (m0(xh) - m1(xh)).abs().max() > 1e-3 * m0(xh).abs().max()
    # norm parameters never move
    for n in ("block.norm1.weight", "block.norm2.bias"):
        assert torch.equal(model.get_parameter(n), out.model.get_parameter(n))


def test_fast_path_and_hooked_path_agree_to_the_noise_floor():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(4, 5, 16)
    with torch.no_grad():
        fast = layer(x)
        handle = layer.linear1.register_forward_hook(lambda *a: None)
        slow = layer(x)
        handle.remove()
    reference = layer.double()(x.double()).detach().float()  # grad enabled: the module-by-module path
    assert (slow - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert (fast - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.filterwarnings("ignore:.*nested tensors.*:UserWarning")
def test_encoder_with_padding_mask_nested_fast_path_is_captured_without_the_padding():
    """In eval mode nn.TransformerEncoder packs padded batches into nested tensors."""
    from teleport_cli.nullspace.capture import capture_grams

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            mask = torch.zeros(x.shape[:2], dtype=torch.bool)
            mask[:, 3:] = True  # the last two of five tokens are padding
            return self.head(self.enc(x, src_key_padding_mask=mask)[:, 0])

    model = Padded().eval()
    x = torch.randn(2, 5, 16)
    layers, _ = find_layers(model)
    accs = capture_grams(model, layers, [(x, None)])
    assert all(a.calls == 1 and a.plain for a in accs.values()), {k: (a.calls, a.plain_error) for k, a in accs.items()}
    tokens = x[:, :3].reshape(-1, 16).double()  # only the real tokens reach the first projection
    assert accs["enc.layers.0.self_attn.in_proj"].rows == 6
    for i in range(3):
        assert torch.allclose(accs["enc.layers.0.self_attn.in_proj"].gram[i], tokens.T @ tokens, atol=1e-5)
    assert accs["enc.layers.0.linear1"].rows == 6 and accs["head"].rows == 2
