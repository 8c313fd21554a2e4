"""Buffers are not weights: a causal-mask buffer holding -inf teleports and is written bit-identical."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from teleport_cli.checkpoints.containers import read_checkpoint
from teleport_cli.errors import InputError
from teleport_cli.models.loading import load_model

ROOT = Path(__file__).resolve().parents[2]
VOCAB, T, D = 11, 8, 16


class TinyCausalLM(nn.Module):
    """One attention block whose causal mask is a buffer ``triu(full(-inf), 1)``, as many LMs keep it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB)
        self.register_buffer("mask", torch.triu(torch.full((T, T), float("-inf")), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.long())
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        att = (q @ k.transpose(-2, -1) / math.sqrt(D) + self.mask).softmax(-1)
        return self.head(h + self.proj(att @ v))


def tiny_lm() -> TinyCausalLM:
    return TinyCausalLM()


def _files(tmp_path: Path) -> tuple[Path, Path, Path, dict]:
    torch.manual_seed(0)
    state = TinyCausalLM().state_dict()
    ckpt = tmp_path / "lm.safetensors"
    save_file(state, str(ckpt), metadata={"format": "pt"})
    g = torch.Generator().manual_seed(1)
    for name, n in (("cal", 96), ("hold", 48)):
        tokens = torch.randint(0, VOCAB, (n, T + 1), generator=g)
        save_file({"inputs": tokens[:, :-1].float().contiguous(), "targets": tokens[:, 1:].contiguous()}, str(tmp_path / f"{name}.safetensors"))
    return ckpt, tmp_path / "cal.safetensors", tmp_path / "hold.safetensors", state


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_causal_mask_buffer_teleports_and_is_written_bit_identical(tmp_path):
    ckpt, cal, hold, state = _files(tmp_path)
    out = tmp_path / "out.safetensors"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{Path(__file__).parent}"}
    p = subprocess.run([sys.executable, "-m", "teleport_cli", "apply", str(ckpt), "--data", str(cal), "--holdout", str(hold),
                        "-o", str(out), "--model", "test_buffers:tiny_lm", "--loss", "lm", "--steps", "3", "--device", "cpu",
                        "--json", "-q"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["verified"] is True and doc["steps_accepted"] >= 1
    after = load_file(str(out))
    assert torch.isneginf(after["mask"]).sum() == T * (T - 1) // 2
    assert torch.equal(_bits(after["mask"]), _bits(state["mask"]))  # bit-identical, -inf included
    assert any(not torch.equal(after[k], state[k]) for k in ("qkv.weight", "proj.weight", "head.weight"))


def test_inf_in_a_parameter_is_refused_and_named(tmp_path):
    ckpt, _, _, state = _files(tmp_path)
    state["proj.weight"][1, 2] = float("inf")
    save_file(state, str(ckpt), metadata={"format": "pt"})
    read_checkpoint(ckpt)  # the reader cannot tell parameters from buffers; the model can
    with pytest.raises(InputError, match=r"NaN or Inf in proj\.weight \(parameters must be finite\)"):
        load_model(ckpt, model_spec=f"{__name__}:tiny_lm")


def test_nan_in_a_buffer_is_refused_and_named(tmp_path):
    ckpt, _, _, state = _files(tmp_path)
    state["mask"][0, 0] = float("nan")
    save_file(state, str(ckpt), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"state_dict has NaN in mask"):
        read_checkpoint(ckpt)
