"""Gram capture against brute force; conv invariance for stride, padding, dilation and groups."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from teleport_cli.nullspace.bases import layer_basis
from teleport_cli.nullspace.capture import capture_grams
from teleport_cli.nullspace.layers import spec_of, weight_blocks
from teleport_cli.nullspace.selection import find_layers

CONV_CASES = [
    dict(in_channels=3, out_channels=4, kernel_size=3, stride=1, padding=1),
    dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=0),
    dict(in_channels=2, out_channels=3, kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),  # depthwise
    dict(in_channels=4, out_channels=8, kernel_size=3, padding="same", dilation=2, groups=4),
    dict(in_channels=3, out_channels=2, kernel_size=3, padding=1, padding_mode="reflect"),
]


def brute_force_conv_gram(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """One row per output position and group: the patch the conv multiplies, by explicit loops."""
    g = conv.groups
    cg = conv.in_channels // g
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    sh, sw = conv.stride
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        ph = pw = 0
    elif conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        x = F.pad(x, [tw // 2, tw - tw // 2, th // 2, th - th // 2])
        ph = pw = 0
    else:
        ph, pw = conv.padding
    x = F.pad(x, [pw, pw, ph, ph]).double()
    h_out = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    grams = torch.zeros(g, cg * kh * kw, cg * kh * kw, dtype=torch.float64)
    for n in range(x.shape[0]):
        for i in range(h_out):
            for j in range(w_out):
                patch = x[n, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
                for k in range(g):
                    r = patch[k * cg : (k + 1) * cg].reshape(-1)
                    grams[k] += torch.outer(r, r)
    return grams


@pytest.mark.parametrize("kwargs", CONV_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_conv_gram_equals_brute_force_patch_gram(kwargs):
    conv = nn.Conv2d(**kwargs).double()
    x = torch.randn(2, kwargs["in_channels"], 7, 6, dtype=torch.float64)
    layers, _ = find_layers(nn.Sequential(conv))
    accs = capture_grams(nn.Sequential(conv), layers, [(x, None)])
    acc = accs["0"]
    assert acc.plain and acc.calls == 1
    assert torch.allclose(acc.gram, brute_force_conv_gram(conv, x), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("kwargs", CONV_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_projected_conv_update_leaves_outputs_unchanged(kwargs):
    conv = nn.Conv2d(**kwargs).double()
    # fewer output positions than d_in per group, so that every layer has an exact null space
    size = (3, 3) if kwargs.get("padding") == 0 else (2, 3)
    x = torch.randn(1, kwargs["in_channels"], *size, dtype=torch.float64)
    model = nn.Sequential(conv)
    layers, _ = find_layers(model)
    acc = capture_grams(model, layers, [(x, None)])["0"]
    basis = layer_basis("0", acc.gram, 1.0)
    assert basis.null_dim > 0
    spec = spec_of("0", conv)
    before = conv(x)
    step = basis.project(weight_blocks(spec, torch.randn_like(conv.weight))).reshape(conv.weight.shape)
    assert step.norm() > 1e-2 * conv.weight.norm()  # a real move, not a zero step
    with torch.no_grad():
        conv.weight += 10.0 * step
    assert (conv(x) - before).abs().max() <= 1e-10 * before.abs().max()


def test_linear_gram_is_float64_sum_over_batches_and_tokens():
    lin = nn.Linear(5, 3)
    model = nn.Sequential(lin)
    batches = [(torch.randn(4, 2, 5), None), (torch.randn(3, 2, 5), None)]  # (N, tokens, d_in)
    layers, _ = find_layers(model)
    acc = capture_grams(model, layers, batches)["0"]
    rows = torch.cat([b.reshape(-1, 5) for b, _ in batches]).double()
    assert acc.gram.dtype == torch.float64
    assert acc.rows == 14
    assert torch.allclose(acc.gram[0], rows.T @ rows, rtol=1e-12)


class StdConv(nn.Conv2d):
    """Weight standardisation inside forward: not a plain conv of the stored weight."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_plain_check_rejects_weight_transforming_subclass_and_hooks_are_removed():
    model = nn.Sequential(StdConv(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 16, 2))
    layers, _ = find_layers(model)
    accs = capture_grams(model, layers, [(torch.randn(2, 2, 4, 4), None)])
    assert accs["0"].plain is False and accs["0"].plain_error > 1e-2
    assert accs["2"].plain is True
    assert all(not m._forward_hooks for m in model.modules())


def test_tied_and_frozen_weights_are_excluded_with_reason():
    a, b, c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
    b.weight = a.weight
    c.weight.requires_grad_(False)
    layers, excluded = find_layers(nn.Sequential(a, b, c))
    assert layers == []
    reasons = {e.name: e.reason for e in excluded}
    assert "tied" in reasons["0"] and "tied" in reasons["1"] and "frozen" in reasons["2"]


def test_a_conv_that_pads_in_forward_is_left_alone_not_a_crash():
    """timm's Conv2dSame pads its input inside forward (module.padding is 0): on a 4x4 input its
    bare input is smaller than the 5x5 kernel, so its patches do not exist. The layer fails the
    plain-map check and is left out with that reason; the other layers teleport, and the conv's
    weight does not move (NASNet and PNASNet at their minimum input crashed with exit 1 here)."""
    from timm.layers import Conv2dSame

    from teleport_cli.config import TeleportConfig
    from teleport_cli.pipeline import teleport

    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 4, 5, stride=2), nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(60, 3, 4, 4), torch.randint(0, 3, (60,))
    assert model(x).shape == (60, 3)  # the model itself runs: timm pads to 'same'
    before = model[0].weight.detach().clone()
    out = teleport(model, (x, y), TeleportConfig(steps=2, batch_size=64, guard_fraction=0.0, tau=0.9))
    layers = {l.name: l for l in out.layers}
    assert not layers["0"].teleported and layers["0"].reason.startswith("output is not F.conv2d")
    assert torch.equal(out.model[0].weight, before)
    # the linear layers behind it were captured: one row per calibration sample (60 less the 12
    # of the seeded 20% held-out split)
    assert layers["2"].rows == 60 - 12 and layers["4"].rows == 60 - 12
