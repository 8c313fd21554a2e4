"""More transformers folders, teleported with no model flags and reloaded with from_pretrained:
a padded GPT-2 in a pickle folder (pytorch_model.bin), a BERT classifier in safetensors shards,
text through the folder's tokenizer and images through its preprocessor_config.json, and
`teleport report` / `teleport inspect` on the same folders. Every figure of the tool's JSON is
recomputed here in float64 from the reloaded folders."""

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
SAMPLES = ROOT / "sample_checkpoints"
TEXT = SAMPLES / "shakespeare_excerpt.txt"


def _run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "teleport_cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=900)


def _padded_bytes(n: int, t: int, offset: int, seed: int) -> dict[str, torch.Tensor]:
    """Right-padded byte sequences: input_ids (pad id 0), attention_mask, labels (-100 at padding
    and at one real position per row)."""
    data = torch.tensor(list(TEXT.read_bytes()[offset : offset + n * t]), dtype=torch.int64).view(n, t)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 3, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), data, torch.zeros_like(data))
    labels = torch.where(mask.bool(), data, torch.full_like(data, -100))
    labels[torch.arange(n), torch.randint(1, t // 3, (n,), generator=g)] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _hf_loss(model, d: dict[str, torch.Tensor], batch: int) -> tuple[float, float]:
    """(transformers' loss of the set as one batch, the token-weighted mean of its loss per batch)."""
    with torch.no_grad():
        whole = float(model(**d).loss)
        total = count = 0.0
        for i in range(0, len(d["input_ids"]), batch):
            b = {k: v[i : i + batch] for k, v in d.items()}
            c = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b).loss) * c
            count += c
    return whole, total / count


def test_padded_gpt2_pickle_folder_losses_are_transformers_own(tmp_path):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                                                  bos_token_id=None, eos_token_id=None))
    train = _padded_bytes(256, 48, 0, 1)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for i in range(25):
        b = {k: v[i * 8 % 256 : i * 8 % 256 + 16] for k, v in train.items()}
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path / "gpt2"
    model.eval().config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # what save_pretrained wrote before safetensors
    cal, hold = _padded_bytes(48, 48, 300000, 2), _padded_bytes(40, 48, 600000, 3)
    save_file(cal, str(tmp_path / "cal.safetensors"))
    save_file(hold, str(tmp_path / "hold.safetensors"))
    out = tmp_path / "out"
    p = _run("apply", folder, "--data", tmp_path / "cal.safetensors", "--holdout", tmp_path / "hold.safetensors", "-o", out,
             "--batch-size", "8", "--steps", "3", "--json", "-q")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["verified"] and doc["steps_accepted"] >= 1
    assert sorted(os.listdir(out)) == ["config.json", "pytorch_model.bin", "teleport.json"]
    reloaded, info = transformers.GPT2LMHeadModel.from_pretrained(out, use_safetensors=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, d in (("calibration", cal), ("holdout", hold)):
        for m, key in ((model, "loss_before"), (reloaded, "loss_after")):
            whole, weighted = _hf_loss(m.double().eval(), d, 8)
            assert doc[name][key] == pytest.approx(whole, rel=1e-5) and doc[name][key] == pytest.approx(weighted, rel=1e-5)
        assert doc[name]["samples"] == len(d["input_ids"])
    # the pickle keeps its keys in order, its dtypes and its tie; only linear weights moved
    a = torch.load(folder / "pytorch_model.bin", weights_only=True)
    b = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert list(a) == list(b) and all(a[k].dtype == b[k].dtype for k in a)
    assert b["lm_head.weight"].data_ptr() == b["transformer.wte.weight"].data_ptr()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for k in changed)
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a if k not in changed)


def _digit_tokens(rows: slice, seed: int) -> dict[str, torch.Tensor]:
    """8x8 digits as token sequences: [CLS]=1, then pixel value + 2, right-padded (pad 0)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x[rows], dtype=torch.int64) + 2, torch.tensor(y[rows])
    ids = torch.cat([torch.ones(len(x), 1, dtype=torch.int64), x], 1)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(48, 66, (len(x),), generator=g)
    mask = (torch.arange(65)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": y}


def test_bert_classifier_in_shards_teleports_and_keeps_the_shards(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=72, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(cfg)
    train = _digit_tokens(slice(0, 1200), 0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        idx = torch.randint(0, 1200, (32,), generator=g)
        loss = model(**{k: v[idx] for k, v in train.items()}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path / "bert"
    model.eval().save_pretrained(folder, max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    cal, hold = _digit_tokens(slice(1200, 1296), 2), _digit_tokens(slice(1400, 1496), 3)
    save_file(cal, str(tmp_path / "cal.safetensors"))
    save_file(hold, str(tmp_path / "hold.safetensors"))
    out = tmp_path / "out"
    p = _run("apply", folder, "--data", tmp_path / "cal.safetensors", "--holdout", tmp_path / "hold.safetensors", "-o", out,
             "--steps", "3", "--json", "-q")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["verified"] and doc["steps_accepted"] >= 1
    reloaded, info = transformers.BertForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    a64, b64 = model.double(), reloaded.double().eval()
    for name, d in (("calibration", cal), ("holdout", hold)):
        with torch.no_grad():
            za, zb = a64(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits, b64(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
        y = d["labels"]
        assert doc[name]["loss_before"] == pytest.approx(float(torch.nn.functional.cross_entropy(za, y)), rel=1e-5)
        assert doc[name]["loss_after"] == pytest.approx(float(torch.nn.functional.cross_entropy(zb, y)), rel=1e-5)
        assert doc[name]["max_abs_logit_diff"] == pytest.approx(float((za - zb).abs().max()), rel=1e-3, abs=1e-5)
        assert doc[name]["accuracy_after"] == pytest.approx(float((zb.argmax(1) == y).double().mean()))
    # the same shards with the same keys in the same order, dtypes and header metadata
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == index["weight_map"]
    changed = set()
    for shard in shards:
        a, b = load_file(str(folder / shard)), load_file(str(out / shard))
        assert list(a) == list(b) and all(a[k].dtype == b[k].dtype for k in a)
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
        moved = {k for k in a if not torch.equal(a[k], b[k])}
        assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a if k not in moved)
        changed |= moved
    linear = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert changed and changed <= linear
    # report reads both folders and gives the losses recomputed above; inspect lists every Linear
    r = _run("report", folder, out, "--data", tmp_path / "cal.safetensors", "--holdout", tmp_path / "hold.safetensors",
             "--iterations", "3", "--probes", "1", "--json", "-q")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    for name in ("calibration", "holdout"):
        assert rep["datasets"][name]["loss_a"] == pytest.approx(doc[name]["loss_before"], rel=1e-5)
        assert rep["datasets"][name]["loss_b"] == pytest.approx(doc[name]["loss_after"], rel=1e-5)
    assert rep["invariance"]["passed"] is True
    i = _run("inspect", out, "--data", tmp_path / "cal.safetensors", "--json", "-q")
    assert i.returncode == 0, i.stderr
    rows = {r["name"]: r for r in json.loads(i.stdout)["layers"]}
    assert {n[: -len(".weight")] for n in linear} <= set(rows)
    assert "embedding" in rows["bert.embeddings.word_embeddings"]["reason"]


def test_text_is_tokenised_with_the_folders_own_tokenizer(tmp_path):
    from teleport_cli.checkpoints.containers import read_checkpoint
    from teleport_cli.data.sources import load_data
    from teleport_cli.models.transformers_adapter import build_transformers_model

    folder = SAMPLES / "gpt2_shakespeare"
    text = TEXT.read_text()[:9000] + "\nHé — Ünïcode\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ckpt = read_checkpoint(str(folder))
    model = build_transformers_model(folder, ckpt.container.layout["transformers"])
    data = load_data(tmp_path / "t.txt", None, model).data
    ids = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)(text, add_special_tokens=False)["input_ids"]
    t = model.hf_context + 1
    windows = torch.tensor(ids[: len(ids) // t * t]).view(-1, t)
    assert torch.equal(data.inputs, windows[:, :-1]) and torch.equal(data.targets, windows[:, 1:])
    p = _run("inspect", folder, "--data", tmp_path / "t.txt", "--json", "-q")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["samples"] == len(windows)


def test_images_go_through_the_folders_preprocessor_config(tmp_path):
    from PIL import Image

    from teleport_cli.checkpoints.containers import read_checkpoint
    from teleport_cli.data.sources import load_data
    from teleport_cli.models.transformers_adapter import build_transformers_model

    # (ResNet: transformers 5 saves ViT under its legacy key names, which a strict load refuses)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    num_labels=2, id2label={0: "dog", 1: "cat"}, label2id={"dog": 0, "cat": 1})
    folder = tmp_path / "resnet"
    transformers.ResNetForImageClassification(cfg).save_pretrained(folder)
    proc = transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.2, 0.4, 0.6], image_std=[0.5, 0.25, 0.125])
    proc.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    expected, labels = [], []
    for label, name in ((0, "dog"), (1, "cat")):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for j in range(3):
            arr = torch.randint(0, 256, (20 + j, 24, 3), generator=g, dtype=torch.uint8).numpy()
            path = tmp_path / "imgs" / name / f"{j}.png"
            Image.fromarray(arr).save(path)
            expected.append((name, j, proc(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0], label))
    ckpt = read_checkpoint(str(folder))
    model = build_transformers_model(folder, ckpt.container.layout["transformers"])
    data = load_data(tmp_path / "imgs", None, model).data
    expected.sort(key=lambda e: (e[0], e[1]))  # class folders and files in sorted order
    assert torch.equal(data.inputs, torch.stack([e[2] for e in expected]))
    assert data.targets.tolist() == [e[3] for e in expected]  # classes by id2label, not by folder order
    p = _run("inspect", folder, "--data", tmp_path / "imgs", "--json", "-q")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["samples"] == 6


def test_bench_resumes_the_gpt2_sample_with_its_own_loss():
    folder = SAMPLES / "gpt2_shakespeare"
    p = _run("bench", folder, "--data", SAMPLES / "gpt2_shakespeare_calibration.safetensors", "--holdout", SAMPLES / "gpt2_shakespeare_holdout.safetensors",
             "--steps", "10", "--seeds", "1", "--variants", "original", "--json", "-q")
    assert p.returncode == 0, p.stderr
    curve = json.loads(p.stdout)["variants"]["original"]["holdout_curve_mean"]
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).double().eval()
    tokens = load_file(str(SAMPLES / "gpt2_shakespeare_holdout.safetensors"))["tokens"]
    with torch.no_grad():
        assert curve[0] == [0, pytest.approx(float(model(input_ids=tokens, labels=tokens).loss), rel=1e-5)]
