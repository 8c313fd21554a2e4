"""Transformers folders end to end: tiny GPT-2 and Llama trained briefly on the shipped
Shakespeare bytes, saved with save_pretrained, teleported with no model flags via the CLI,
reloaded with from_pretrained and compared in float64 against the tool's JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "sample_checkpoints" / "shakespeare_excerpt.txt"
T = 32


def _windows() -> torch.Tensor:
    ids = torch.tensor(list(TEXT.read_bytes()[:60000]), dtype=torch.int64)
    n = len(ids) // (T + 1)
    return ids[: n * (T + 1)].view(n, T + 1)


def _train_and_save(model, folder: Path, win: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(25):
        b = win[torch.randint(200, len(win), (16,), generator=g)]
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(folder)


def _run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "teleport_cli", *args], capture_output=True, text=True, env=env, timeout=900)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg), transformers.GPT2LMHeadModel


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg), transformers.LlamaForCausalLM


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_folder_teleports_with_no_flags_and_reloads_with_the_reported_losses(build, tmp_path):
    torch.manual_seed(0)
    model, cls = build()
    win = _windows()
    folder = tmp_path / "model"
    _train_and_save(model, folder, win)
    save_file({"tokens": win[:48].contiguous()}, str(tmp_path / "cal.safetensors"))
    save_file({"tokens": win[48:96].contiguous()}, str(tmp_path / "hold.safetensors"))
    out = tmp_path / "out"
    p = _run("apply", str(folder), "--data", str(tmp_path / "cal.safetensors"), "--holdout", str(tmp_path / "hold.safetensors"),
             "-o", str(out), "--steps", "5", "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["verified"] and doc["steps_accepted"] >= 1
    kinds = {l["name"]: l for l in doc["layers"]}
    moved = [n for n, l in kinds.items() if l["teleported"] and l["rel_weight_change"] > 0]
    assert moved
    if cls is transformers.GPT2LMHeadModel:
        assert kinds["transformer.h.0.attn.c_attn"]["kind"] == "hf_conv1d"
        assert kinds["lm_head"]["reason"].startswith("weight is tied")
    else:
        assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"} <= set(moved)
    # reload as transformers does it: no missing or unexpected keys, and the JSON's losses
    reloaded, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reloaded = reloaded.double().eval()
    for name, f in (("calibration", "cal"), ("holdout", "hold")):
        tokens = load_file(str(tmp_path / f"{f}.safetensors"))["tokens"]
        with torch.no_grad():
            loss = float(reloaded(input_ids=tokens, labels=tokens).loss)
        assert loss == pytest.approx(doc[name]["loss_after"], rel=1e-5)
    # same files, same keys in the same order, same dtypes, header metadata as read
    assert (folder / "config.json").read_bytes() == (out / "config.json").read_bytes()
    a, b = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert list(a) == list(b) and all(a[k].dtype == b[k].dtype for k in a)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith("weight") for k in changed)
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a if k not in changed)
    assert json.loads((out / "teleport.json").read_text())["source_sha256"]


def test_config_needing_remote_code_is_refused_with_exit_3(tmp_path):
    model, _ = _gpt2()
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    save_file({"tokens": _windows()[:8].contiguous()}, str(tmp_path / "cal.safetensors"))
    p = _run("apply", str(tmp_path / "m"), "--data", str(tmp_path / "cal.safetensors"), "-o", str(tmp_path / "out"))
    assert p.returncode == 3 and "remote code" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()
