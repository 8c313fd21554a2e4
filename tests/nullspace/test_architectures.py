"""Coverage sweep: every timm ``test_*`` model teleported at tau = 1 on two samples.

Each model (random init, 32x32 RGB, 3 classes) must either be teleported (weights moved and
``max |logit difference| <= 1e-4 * max |logit|`` on the calibration set, float32) or be
refused cleanly (not verified); at least 90% must be teleported. Every buffer (BatchNorm
running statistics included) and every parameter outside the teleported weights stays
bit-identical. The logits are recomputed here, independently of the tool's own check.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import timm

spec = importlib.util.spec_from_file_location("bench_architectures", Path(__file__).resolve().parents[2] / "bench" / "architectures.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # dataclasses look their module up
spec.loader.exec_module(bench)

MODELS = timm.list_models("test_*")
RESULTS: dict[str, object] = {}



def _row(arch):
    if arch not in RESULTS:
        RESULTS[arch] = bench.sweep_one(arch)
    return RESULTS[arch]


@pytest.mark.parametrize("arch", MODELS)
def test_architecture_is_teleported_or_refused_cleanly(arch):
    row = _row(arch)
    model = bench.build(arch).eval()
    assert row.teleported_layers > 0 or not row.verified
    if row.verified and row.steps > 0:
        assert row.logits_kept, f"{arch}: verified but logits moved by {row.max_logit_diff:.3g} (max {row.max_logit:.3g})"
    # only the teleported layers' weights changed; buffers are bit-identical
    assert set(row.changed_keys) <= set(row.allowed_keys)
    buffers = {n for n, _ in model.named_buffers()}
    assert not buffers & set(row.changed_keys)
    if row.teleported:
        assert row.changed_keys and row.moved > 0


def test_at_least_90_percent_of_timm_test_models_are_teleported():
    rows = [_row(a) for a in MODELS]
    done = [r.arch for r in rows if r.teleported]
    assert len(done) >= 0.9 * len(rows), f"teleported: {done}"


def test_batchnorm_running_statistics_are_bit_identical_after_a_teleport():
    row = _row("test_resnet")
    model = bench.build("test_resnet")
    assert any(n.endswith("running_mean") for n, _ in model.named_buffers())
    assert row.teleported and row.steps > 0
    assert not any("running" in k or "num_batches" in k for k in row.changed_keys)


def test_timm_vit_fused_qkv_attention_projection_mlp_and_head_are_teleported():
    rows = {l.name: l for l in _row("test_vit").layer_rows}
    for name in ("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.attn.qkv", "head"):
        assert rows[name].teleported and rows[name].kind == "linear", name
        assert rows[name].rows == bench.SAMPLES * (1 if name == "head" else 5)  # 4 patches + class token
        assert rows[name].rel_weight_change > 0, name
    assert rows["blocks.0.attn.qkv"].d_out == 3 * rows["blocks.0.attn.qkv"].d_in
