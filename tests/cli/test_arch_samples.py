"""`teleport apply` end to end, with no model flags, on every shipped timm and char_lm sample.

Few steps and a seeded choice of calibration samples keep this fast; the figures at default
settings are in the README (bench/arch_samples.py). Losses are checked against an
independent float64 evaluation: images read with PIL and preprocessed by hand (scale, zero
padding, normalisation), tokens through the model built from the stored kwargs.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from teleport_cli.cli import cli
from teleport_cli.models.char_lm import CharLM

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
IMAGE_ARCHS = ["test_resnet", "test_convnext", "test_vit"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def images_by_hand(folder: Path, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Folder order (sorted class folders, sorted files), pixels / 255, zero-pad to the input size, normalise."""
    xs, ys = [], []
    for cls in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        for f in sorted((folder / cls).glob("*.png")):
            xs.append(np.asarray(Image.open(f), dtype=np.float64) / 255.0)
            ys.append(cfg["class_names"].index(cls))
    x = torch.tensor(np.stack(xs)).unsqueeze(1)
    pad = (cfg["input_size"][1] - x.shape[-1]) // 2
    x = F.pad(x, (pad, pad, pad, pad))
    return (x - cfg["mean"][0]) / cfg["std"][0], torch.tensor(ys)


@pytest.mark.parametrize("arch", IMAGE_ARCHS)
@pytest.mark.parametrize("stage", ["mid", "converged"])
def test_apply_on_shipped_fmnist_checkpoint(arch, stage, tmp_path):
    ckpt = SAMPLES / f"fmnist_{arch}_{stage}.safetensors"
    out = tmp_path / "out.safetensors"
    n = 64 if stage == "mid" else 32
    r = run("apply", ckpt, "--data", SAMPLES / "fmnist_calibration", "--holdout", SAMPLES / "fmnist_holdout",
            "-o", out, "--samples", n, "--steps", 2 if stage == "mid" else 1, "--json", "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["verified"] and doc["arch"] == arch and doc["steps_accepted"] >= 1
    assert doc["grad_norm_after"] > doc["grad_norm_before"]
    meta, out_meta = metadata(ckpt), metadata(out)
    cfg = json.loads(meta["data_config"])
    assert json.loads(out_meta["calibration_data"])["preprocessing"]["input_size"] == cfg["input_size"]
    model = timm.create_model(arch, **json.loads(meta["model_kwargs"])).double().eval()
    model.load_state_dict(load_file(ckpt))
    idx = json.loads(out_meta["calibration_data"])["selection"]["indices"]
    for key, folder, index in (("calibration", "fmnist_calibration", idx), ("holdout", "fmnist_holdout", None)):
        x, y = images_by_hand(SAMPLES / folder, cfg)
        if index is not None:
            x, y = x[index], y[index]
        with torch.no_grad():
            logits = model(x)
        assert doc[key]["samples"] == len(y)
        assert doc[key]["loss_before"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-4)
        assert doc[key]["accuracy_before"] == pytest.approx((logits.argmax(1) == y).double().mean().item())


@pytest.mark.parametrize("stage", ["mid", "converged"])
def test_apply_on_shipped_char_lm(stage, tmp_path):
    ckpt = SAMPLES / f"char_lm_{stage}.safetensors"
    out = tmp_path / "out.safetensors"
    r = run("apply", ckpt, "--data", SAMPLES / "shakespeare_calibration.safetensors", "--holdout", SAMPLES / "shakespeare_holdout.safetensors",
            "-o", out, "--steps", 2, "--json", "-q", "--device", "cpu")  # --loss lm comes from the checkpoint's metadata
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["verified"] and doc["arch"] == "char_lm" and doc["grad_norm_after"] > doc["grad_norm_before"]
    meta = metadata(ckpt)
    assert meta["loss"] == "lm" and metadata(out)["loss"] == "lm"
    model = CharLM(**json.loads(meta["model_kwargs"])).double().eval()
    model.load_state_dict(load_file(ckpt))
    for key, name in (("calibration", "shakespeare_calibration"), ("holdout", "shakespeare_holdout")):
        tokens = load_file(SAMPLES / f"{name}.safetensors")["tokens"]
        with torch.no_grad():
            logits = model(tokens[:, :-1])
        y = tokens[:, 1:]
        assert doc[key]["loss_before"] == pytest.approx(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item(), rel=1e-5)
        assert doc[key]["accuracy_before"] == pytest.approx((logits.argmax(-1) == y).double().mean().item())  # token accuracy


def test_char_lm_reads_the_shipped_text_with_the_stored_vocabulary(tmp_path):
    r = run("apply", SAMPLES / "char_lm_mid.safetensors", "--data", SAMPLES / "shakespeare_excerpt.txt", "--samples", 48,
            "--seed", 1, "-o", tmp_path / "out.safetensors", "--steps", 1, "--json", "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["calibration"]["samples"] + doc["holdout"]["samples"] == 48  # a seeded 20% split of the 48 windows
    rec = json.loads(metadata(tmp_path / "out.safetensors")["calibration_data"])
    assert rec["kind"] == "text" and rec["selection"]["available"] == 1_000_000 // 65


@pytest.mark.parametrize("name, data, rows", [
    ("fmnist_test_vit_mid", "fmnist_calibration", {"blocks.0.attn.qkv": 256 * ((28 // 7) ** 2 + 1), "head": 256}),
    ("char_lm_mid", "shakespeare_calibration.safetensors", {"blocks.0.attn.qkv": 128 * 64, "head": 128 * 64}),
])
def test_inspect_reads_the_shipped_data_kinds(name, data, rows):
    """Rows per layer: samples x tokens (ViT: 16 patches + the class token; char_lm: 64 positions)."""
    r = run("inspect", SAMPLES / f"{name}.safetensors", "--data", SAMPLES / data, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    got = {l["name"]: l["rows"] for l in doc["layers"] if l["name"] in rows}
    assert got == rows
