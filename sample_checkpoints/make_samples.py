"""Regenerate the shipped MLP sample checkpoints and data sets, deterministically.

Run from the repository root (needs scikit-learn, installed by ``make setup``)::

    .venv/bin/python sample_checkpoints/make_samples.py

Writes into sample_checkpoints/:

* ``mlp_digits_mid.safetensors``: MLP 64-128-64-10 after 5 epochs of SGD (lr 0.05, batch 32):
  resumed training still has work to do;
* ``mlp_digits_converged.safetensors``: the same run after 150 epochs;
* ``digits_train.safetensors``: the training split (1397 samples);
* ``digits_calibration.safetensors``: 256 samples drawn from the training split;
* ``digits_holdout.safetensors``: the 400 held-out samples (never trained on).

Inputs are the 8x8 digit images flattened to 64 values and divided by 16 (range [0, 1]).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from teleport_cli.models.builtin import MLP

HERE = Path(__file__).resolve().parent
SEED = 0
ARCH = "mlp"
KWARGS = {"in_features": 64, "hidden": [128, 64], "num_classes": 10}
DATA_CONFIG = {"input_size": [64], "mean": [0.0], "std": [16.0], "note": "8x8 digits flattened, divided by 16"}
MID_EPOCHS, CONVERGED_EPOCHS = 5, 150
LR, BATCH = 0.05, 32


def splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    test, train = perm[:400], perm[400:]
    cal = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(SEED + 1))[:256]]
    return {"train": (x[train], y[train]), "calibration": (x[cal], y[cal]), "holdout": (x[test], y[test])}


def save_model(model: torch.nn.Module, path: Path, epochs: int) -> None:
    meta = {
        "format": "pt",
        "arch": ARCH,
        "model_kwargs": json.dumps(KWARGS),
        "data_config": json.dumps(DATA_CONFIG),
        "training": json.dumps({"epochs": epochs, "optimizer": "sgd", "lr": LR, "batch_size": BATCH, "seed": SEED}),
    }
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)


def main() -> None:
    torch.manual_seed(SEED)
    data = splits()
    for name, (x, y) in data.items():
        save_file({"inputs": x.contiguous(), "targets": y.contiguous()}, str(HERE / f"digits_{name}.safetensors"))
    x, y = data["train"]
    model = MLP(**KWARGS)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(SEED + 2)
    for epoch in range(1, CONVERGED_EPOCHS + 1):
        for idx in torch.randperm(len(y), generator=g).split(BATCH):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if epoch == MID_EPOCHS:
            save_model(model, HERE / "mlp_digits_mid.safetensors", epoch)
        if epoch % 25 == 0 or epoch == MID_EPOCHS:
            with torch.no_grad():
                hx, hy = data["holdout"]
                print(f"epoch {epoch}: train loss {F.cross_entropy(model(x), y):.4f}, held-out accuracy {(model(hx).argmax(1) == hy).float().mean():.3f}")
    save_model(model, HERE / "mlp_digits_converged.safetensors", CONVERGED_EPOCHS)


if __name__ == "__main__":
    main()
