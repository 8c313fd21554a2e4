"""Builders shared by the checkpoint-format tests: real files made from the shipped MLP."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from teleport_cli.config import TeleportConfig
from teleport_cli.models.builtin import MLP
from teleport_cli.pipeline import apply

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
MID = SAMPLES / "mlp_digits_mid.safetensors"
CAL = SAMPLES / "digits_calibration.safetensors"
HOLD = SAMPLES / "digits_holdout.safetensors"
KWARGS = {"in_features": 64, "hidden": [128, 64], "num_classes": 10}
MOVABLE = {"hidden.0.weight", "hidden.1.weight", "head.weight"}
FAST = TeleportConfig(steps=4, device="cpu")


def mid_state() -> dict[str, torch.Tensor]:
    return load_file(str(MID))


def mid_metadata() -> dict[str, str]:
    with safe_open(str(MID), "pt") as f:
        return dict(f.metadata())


def mlp(state: dict[str, torch.Tensor] | None = None) -> MLP:
    m = MLP(**KWARGS)
    if state is not None:
        m.load_state_dict({k: v.float() for k, v in state.items()})
    return m.eval()


def run(ckpt, out, *, config: TeleportConfig = FAST, **kw):
    """``pipeline.apply`` on the digits calibration and held-out sets."""
    return apply(ckpt, CAL, out, config, holdout=HOLD, **kw)


def loss64(state: dict[str, torch.Tensor], data: Path = CAL) -> float:
    """Cross-entropy of the MLP with ``state`` (any dtype) on a data file, in float64."""
    d = load_file(str(data))
    m = mlp().double()
    m.load_state_dict({k: v.double() for k, v in state.items()})
    with torch.no_grad():
        return F.cross_entropy(m(d["inputs"].double()), d["targets"]).item()


def provenance(path) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return json.loads(meta["checkpoint"])


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
