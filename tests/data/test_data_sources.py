"""Calibration data: image folders through timm's eval transforms, data config precedence,
token and text files, --samples, and the next-token loss of --loss lm."""

import hashlib
import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision import transforms

from teleport_cli.cli import cli
from teleport_cli.data.images import load_image_folder
from teleport_cli.data.sources import choose_samples, load_data
from teleport_cli.data.tokens import load_text_file
from teleport_cli.errors import InputError
from teleport_cli.models.char_lm import CharLM
from teleport_cli.nullspace.losses import LOSS_FUNCTIONS


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def rgb_folder(tmp_path):
    """Two classes of random RGB images of different sizes; names chosen so that sorted order is known."""
    rng = np.random.default_rng(0)
    files = []
    for cls, sizes in (("cat", [(20, 24), (31, 17)]), ("dog", [(16, 16), (40, 22), (25, 25)])):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            path = tmp_path / "imgs" / cls / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)
            files.append((path, cls))
    return tmp_path / "imgs", files


def test_image_folder_matches_the_transforms_built_by_hand(rgb_folder):
    root, files = rgb_folder
    cfg = {"input_size": [3, 16, 16], "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "crop_pct": 0.9, "interpolation": "bicubic", "crop_mode": "center"}
    data, resolved = load_image_folder(root, cfg)
    by_hand = transforms.Compose([
        transforms.Resize(math.floor(16 / 0.9), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(16), transforms.ToTensor(), transforms.Normalize(cfg["mean"], cfg["std"]),
    ])
    expected = torch.stack([by_hand(Image.open(p).convert("RGB")) for p, _ in files])
    assert data.inputs.shape == (5, 3, 16, 16) and data.inputs.dtype == torch.float32
    torch.testing.assert_close(data.inputs, expected, rtol=0, atol=1e-6)
    assert data.targets.tolist() == [0, 0, 1, 1, 1]  # sorted class folders: cat = 0, dog = 1
    assert resolved["input_size"] == [3, 16, 16] and resolved["crop_pct"] == 0.9
    # class_names in the data config fix the indices, whatever the folder order
    data2, _ = load_image_folder(root, {**cfg, "class_names": ["dog", "bird", "cat"]})
    assert data2.targets.tolist() == [2, 2, 0, 0, 0]
    with pytest.raises(InputError, match="not classes of the checkpoint"):
        load_image_folder(root, {**cfg, "class_names": ["dog"]})


def test_data_config_from_metadata_wins_over_timms_default_for_test_models(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    img = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(img, "L").save(tmp_path / "imgs" / "a" / "0.png")
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10)
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 160, 160)  # what timm would pick by itself
    cfg = {"input_size": [1, 32, 32], "mean": [0.3], "std": [0.4], "crop_pct": 32 / 28, "interpolation": "bilinear"}
    data, resolved = load_image_folder(tmp_path / "imgs", cfg, model)
    assert data.inputs.shape == (1, 1, 32, 32) and resolved["input_size"] == [1, 32, 32]
    padded = F.pad(torch.tensor(img, dtype=torch.float32) / 255, (2, 2, 2, 2))  # crop 32 of a 28 image pads with zeros
    torch.testing.assert_close(data.inputs[0, 0], (padded - 0.3) / 0.4, rtol=0, atol=1e-6)
    # no data config: timm's default (3-channel) must not be used silently on a 1-channel model
    with pytest.raises(InputError, match="first convolution takes 1 channels"):
        load_image_folder(tmp_path / "imgs", {}, model)
    with pytest.raises(InputError, match=r"is not \[C, H, W\]"):
        load_image_folder(tmp_path / "imgs", {"input_size": [784]}, model)


def test_token_file_and_text_file(tmp_path):
    tokens = torch.randint(0, 7, (5, 9))
    save_file({"tokens": tokens}, str(tmp_path / "t.safetensors"))
    d = load_data(tmp_path / "t.safetensors", {"vocab": "abcdefg"})
    assert d.kind == "tokens" and torch.equal(d.data.inputs, tokens[:, :-1]) and torch.equal(d.data.targets, tokens[:, 1:])
    with pytest.raises(InputError, match="outside the vocabulary"):
        load_data(tmp_path / "t.safetensors", {"vocab": "abc"})
    save_file({"tokens": tokens.float()}, str(tmp_path / "f.safetensors"))
    with pytest.raises(InputError, match="integer token ids"):
        load_data(tmp_path / "f.safetensors")
    text = "to be, or not to be: that is the question"
    (tmp_path / "x.txt").write_text(text)
    vocab = "".join(sorted(set(text)))
    data = load_text_file(tmp_path / "x.txt", {"vocab": vocab, "context": 7})
    ids = [vocab.index(c) for c in text]
    windows = [ids[i * 8 : i * 8 + 8] for i in range(len(text) // 8)]
    assert data.inputs.tolist() == [w[:-1] for w in windows] and data.targets.tolist() == [w[1:] for w in windows]
    with pytest.raises(InputError, match="outside the checkpoint's vocabulary"):
        load_text_file(tmp_path / "x.txt", {"vocab": vocab.replace("q", ""), "context": 7})


def test_lm_loss_equals_a_hand_computed_next_token_cross_entropy():
    g = torch.Generator().manual_seed(0)
    model = CharLM(vocab_size=11, context=8, d_model=16, n_layers=1, n_heads=2).double()
    tokens = torch.randint(0, 11, (3, 9), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    logits = model(x).detach()
    total = 0.0
    for n in range(3):
        for t in range(8):
            p = torch.softmax(logits[n, t], 0)
            total -= math.log(float(p[y[n, t]]))
    per_token = total / 24
    assert float(LOSS_FUNCTIONS["lm"](logits, y)) / 3 == pytest.approx(per_token, rel=1e-12)
    # causal: changing the last input token leaves the logits of earlier positions unchanged
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 11
    torch.testing.assert_close(model(x2)[:, :-1].detach(), logits[:, :-1])
    with pytest.raises(InputError, match="--loss lm"):
        LOSS_FUNCTIONS["ce"](logits, y)


def test_samples_are_a_seeded_choice_recorded_in_the_output(samples, tmp_path):
    d = load_data(samples / "digits_calibration.safetensors")
    a, b = choose_samples(d, 40, seed=5), choose_samples(load_data(samples / "digits_calibration.safetensors"), 40, seed=5)
    expected = torch.randperm(256, generator=torch.Generator().manual_seed(5))[:40].sort().values
    assert a.selection["indices"] == b.selection["indices"] == expected.tolist()
    assert choose_samples(d, 40, seed=6).selection["indices"] != expected.tolist()
    with pytest.raises(InputError, match="holds 256 samples"):
        choose_samples(d, 300, seed=0)
    out = tmp_path / "out.safetensors"
    r = run("apply", samples / "mlp_digits_mid.safetensors", "--data", samples / "digits_calibration.safetensors",
            "--holdout", samples / "digits_holdout.safetensors", "-o", out, "--samples", "40", "--seed", "5", "--steps", "2", "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["calibration"]["samples"] == 40
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    rec = json.loads(meta["calibration_data"])
    assert rec["kind"] == "tensors" and rec["selection"] == {"samples": 40, "available": 256, "seed": 5, "indices": expected.tolist()}
    cal = load_file(samples / "digits_calibration.safetensors")
    x, y = cal["inputs"][expected], cal["targets"][expected]
    h = hashlib.sha256()
    for t in (x, y):
        h.update(str(tuple(t.shape)).encode()); h.update(str(t.dtype).encode()); h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert meta["calibration_sha256"] == h.hexdigest()
