"""Layer coverage: Conv1d/3d against brute-force patches, nn.MultiheadAttention (self- and
cross-attention), subclasses that are not plain maps, dead branches, exclusion reasons."""

import itertools

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from teleport_cli.audit.survey import DEAD, survey_model
from teleport_cli.nullspace.bases import layer_basis
from teleport_cli.nullspace.capture import capture_grams
from teleport_cli.nullspace.layers import layer_weight, weight_blocks
from teleport_cli.nullspace.selection import find_layers

CONV_ND = [
    (nn.Conv1d, dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1)),
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, padding="same", groups=2)),
    (nn.Conv1d, dict(in_channels=4, out_channels=4, kernel_size=5, padding=2, groups=4, padding_mode="circular")),  # depthwise
    (nn.Conv3d, dict(in_channels=2, out_channels=3, kernel_size=(2, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0))),
    (nn.Conv3d, dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4)),  # depthwise
    (nn.Conv3d, dict(in_channels=4, out_channels=2, kernel_size=2, dilation=(2, 1, 1), groups=2, padding_mode="reflect", padding=1)),
]



def brute_force_patch_gram(conv, x):
    """One row per output position and group, by explicit loops over every position."""
    nd = x.dim() - 2
    g = conv.groups
    cg = conv.in_channels // g
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    elif conv.padding == "same":
        pads = []
        for dd, kk in zip(reversed(d), reversed(k)):
            t = dd * (kk - 1)
            pads += [t // 2, t - t // 2]
        x = F.pad(x, pads)
    else:
        x = F.pad(x, [p for p in reversed(conv.padding) for _ in range(2)])
    x = x.double()
    out = [(x.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(nd)]
    dim = cg * int(torch.tensor(k).prod())
    grams = torch.zeros(g, dim, dim, dtype=torch.float64)
    for n in range(x.shape[0]):
        for pos in itertools.product(*[range(o) for o in out]):
            idx = tuple(slice(p * s[i], p * s[i] + d[i] * (k[i] - 1) + 1, d[i]) for i, p in enumerate(pos))
            patch = x[(n, slice(None), *idx)]
            for j in range(g):
                r = patch[j * cg : (j + 1) * cg].reshape(-1)
                grams[j] += torch.outer(r, r)
    return grams


@pytest.mark.parametrize("cls,kwargs", CONV_ND, ids=lambda v: v.__name__ if isinstance(v, type) else ",".join(f"{a}={b}" for a, b in v.items()))
def test_conv1d_conv3d_gram_equals_brute_force_and_projected_move_keeps_outputs(cls, kwargs):
    conv = cls(**kwargs).double()
    nd = 1 if cls is nn.Conv1d else 3
    x = torch.randn(2, kwargs["in_channels"], *([7] if nd == 1 else [4, 5, 3]), dtype=torch.float64)
    model = nn.Sequential(conv)
    layers, _ = find_layers(model)
    acc = capture_grams(model, layers, [(x, None)])["0"]
    assert acc.plain and acc.calls == 1
    assert torch.allclose(acc.gram, brute_force_patch_gram(conv, x), rtol=1e-12, atol=1e-10)
    # one sample, few positions: an exact null space; a projected move keeps the outputs
    x1 = x[:1, :, :3] if nd == 1 else x[:1, :, :2, :2, :2]
    acc = capture_grams(model, layers, [(x1, None)])["0"]
    basis = layer_basis("0", acc.gram, 1.0)
    assert basis.null_dim > 0 and acc.gram.shape[0] == conv.groups
    spec = layers[0][0]
    before = conv(x1)
    step = basis.project(weight_blocks(spec, torch.randn_like(conv.weight))).reshape(conv.weight.shape)
    assert step.norm() > 1e-2 * conv.weight.norm()
    with torch.no_grad():
        conv.weight += 10.0 * step
    assert (conv(x1) - before).abs().max() <= 1e-10 * before.abs().max()


def manual_mha(mha, q_in, k_in, v_in, mask=None):
    """Batch-first multi-head attention from its definition, in float64: (context, output)."""
    e, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.double().chunk(3)
    else:
        wq, wk, wv = (mha.q_proj_weight.double(), mha.k_proj_weight.double(), mha.v_proj_weight.double())
    bq, bk, bv = mha.in_proj_bias.double().chunk(3)
    q, k, v = q_in @ wq.T + bq, k_in @ wk.T + bk, v_in @ wv.T + bv
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, e // h).transpose(1, 2)
    scores = split(q) @ split(k).transpose(-1, -2) / (e // h) ** 0.5
    a = torch.softmax(scores if mask is None else scores + mask, -1)
    ctx = (a @ split(v)).transpose(1, 2).reshape(q.shape[0], q.shape[1], e)
    return ctx, ctx @ mha.out_proj.weight.double().T + mha.out_proj.bias.double()


class Cross(nn.Module):
    """Cross-attention from a 'text' sequence to an 'image' sequence; the q, k, v inputs differ."""

    def __init__(self, e=8, kdim=None, batch_first=True, causal=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(e, 2, kdim=kdim, vdim=kdim, batch_first=batch_first).double()
        self.batch_first = batch_first
        self.causal = causal

    def forward(self, x):
        q, kv = x
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        mask = nn.Transformer.generate_square_subsequent_mask(q.shape[0 if not self.batch_first else 1], dtype=torch.float64) if self.causal else None
        # the seq-first case also takes the need_weights=True path (explicit softmax, no SDPA)
        out = self.attn(q, kv, kv, need_weights=not self.batch_first, attn_mask=mask, is_causal=self.causal)[0]
        return out if self.batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("mode", ["self", "self-causal", "cross", "cross-kdim", "self-seq-first"])
def test_multihead_attention_grams_and_invariance_after_projected_moves(mode):
    kdim = 6 if mode == "cross-kdim" else None
    model = Cross(8, kdim, batch_first=mode != "self-seq-first", causal=mode == "self-causal")
    q = torch.randn(1, 3, 8, dtype=torch.float64)  # 3 tokens < d_in = 8: exact null spaces
    kv = q if mode.startswith("self") else torch.randn(1, 2, kdim or 8, dtype=torch.float64)
    layers, excluded = find_layers(model)
    assert excluded == []
    names = [s.name for s, _ in layers]
    expected = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"] if kdim else ["attn.in_proj", "attn.out_proj"]
    assert names == expected
    accs = capture_grams(model, layers, [((q, kv), None)])
    assert all(a.calls == 1 and a.plain for a in accs.values())
    assert all(not m._forward_hooks for m in model.modules())
    causal = nn.Transformer.generate_square_subsequent_mask(3, dtype=torch.float64) if model.causal else None
    ctx, out = manual_mha(model.attn, q, kv, kv, causal)
    assert torch.allclose(model((q, kv)), out, atol=1e-12)
    rows = {"q": q[0], "k": kv[0], "v": kv[0], "out": ctx[0]}
    if kdim:
        for part in "qkv":
            assert torch.allclose(accs[f"attn.{part}_proj"].gram[0], rows[part].T @ rows[part], atol=1e-12)
    else:
        gram = accs["attn.in_proj"].gram
        for i, part in enumerate("qkv"):  # one Gram per q, k, v block of in_proj_weight
            assert torch.allclose(gram[i], rows[part].T @ rows[part], atol=1e-12)
        assert torch.equal(gram[0], gram[1]) == mode.startswith("self")
    assert torch.allclose(accs["attn.out_proj"].gram[0], rows["out"].T @ rows["out"], atol=1e-12)

    before = model((q, kv))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for spec, module in layers:
        basis = layer_basis(spec.name, accs[spec.name].gram, 1.0)
        assert basis.null_dim > 0
        w = layer_weight(spec, module)
        step = basis.project(weight_blocks(spec, torch.randn(w.shape, generator=g, dtype=w.dtype))).reshape(w.shape)
        with torch.no_grad():
            w += 2.0 * step / step.norm() * w.norm()
    after = model((q, kv))
    assert (after - before).abs().max() <= 1e-10 * before.abs().max()
    # off the calibration set the function did change: the weights really moved
    other = (torch.randn_like(q), torch.randn_like(kv))
    fresh = Cross(8, kdim, batch_first=mode != "self-seq-first", causal=model.causal)
    fresh.load_state_dict(original)
    assert (model(other) - fresh(other)).abs().max() > 1e-3 * fresh(other).abs().max()


class OwnAttention(nn.MultiheadAttention):
    def forward(self, query, key, value, **kw):
        return super().forward(query * 2, key, value, **kw)


def test_attention_subclass_with_own_forward_and_out_proj_of_plain_mha_are_handled():
    model = nn.Sequential()
    model.add_module("own", OwnAttention(4, 2, batch_first=True))
    layers, excluded = find_layers(model)
    assert layers == []
    assert {e.name for e in excluded} == {"own.in_proj", "own.out_proj"}
    assert all("overrides MultiheadAttention.forward" in e.reason for e in excluded)
    # a plain MHA's out_proj is never reported as a dead Linear: it is captured through the parent
    layers, excluded = find_layers(nn.MultiheadAttention(4, 2))
    assert [s.name for s, _ in layers] == ["in_proj", "out_proj"] and excluded == []


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.std = timm.layers.StdConv2d(3, 4, 3, padding=1)
        self.same = timm.layers.Conv2dSame(3, 4, 3, stride=2)
        self.wn = parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1))
        self.old_wn = torch.nn.utils.weight_norm(nn.Linear(3, 4))
        self.conv1x1 = timm.layers.Conv2dSame(3, 4, 1)  # 'same' with a 1x1 kernel pads nothing: plain
        self.bn = nn.BatchNorm2d(4)
        self.emb = nn.Embedding(5, 3)
        self.dead = nn.Linear(4, 2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        a = self.std(x) + self.wn(x) + self.conv1x1(x)
        b = self.same(x)
        c = self.old_wn(x.mean((2, 3)))
        if x.shape[0] > 100:  # never taken on the calibration set
            return self.dead(c)
        return self.head(self.bn(a).mean((2, 3)) + b.mean((2, 3)) + c) + self.emb.weight.sum()


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
def test_non_plain_subclasses_parametrized_dead_and_non_layer_modules_are_excluded_with_reasons():
    model = Branches().eval()
    s = survey_model(model, (torch.randn(2, 3, 6, 6), torch.zeros(2, dtype=torch.long)), 1.0)
    rows = {r.name: r for r in s.summaries}
    assert not rows["std"].teleported and "not F.conv2d" in rows["std"].reason
    assert not rows["same"].teleported and "not F.conv2d" in rows["same"].reason
    assert not rows["wn"].teleported and "parametrized" in rows["wn"].reason
    assert not rows["old_wn"].teleported and "no weight parameter" in rows["old_wn"].reason
    assert rows["conv1x1"].reason == "null space is empty at this tau"  # passed the plain-map check
    assert rows["bn"].kind == "norm" and "normalisation" in rows["bn"].reason
    assert rows["emb"].kind == "embedding" and "embedding" in rows["emb"].reason
    assert rows["dead"].reason == DEAD and rows["dead"].rank == 0 and rows["head"].teleported
    assert set(rows) == {"std", "same", "wn", "old_wn", "conv1x1", "bn", "emb", "dead", "head"}


def test_head_tied_to_an_embedding_is_excluded():
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t):
            return self.head(torch.relu(self.mix(self.emb(t))))

    layers, excluded = find_layers(TinyLM())
    assert [s.name for s, _ in layers] == ["mix"]
    reasons = {e.name: e.reason for e in excluded}
    assert reasons["head"] == "weight is tied to emb" and reasons["emb"].startswith("embedding")
