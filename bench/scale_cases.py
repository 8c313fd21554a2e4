"""The at-scale cases of bench/cost.py and bench/at_scale.py: timm models at 64x64 on Fashion-MNIST.

Each model is built by timm with random init (seeded), 10 classes, 3 input channels (``img_size=64``
for ViTs); the images are Fashion-MNIST (the Debian dataset, gzip IDX, read by
:func:`bench.fmnist_mlp.read_idx`), scaled to [0, 1], resized bilinearly to 64x64 and replicated
to 3 channels. ``write_case`` writes a checkpoint (safetensors with the ``arch`` and
``model_kwargs`` metadata that ``teleport apply`` reads), a calibration file of the first ``n``
training images and a held-out file of the first ``n`` test images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.fmnist_mlp import DATA, read_idx

SIZE = 64
SCALE_MODELS = ("resnet18", "resnet50", "vit_small_patch16_224", "vit_base_patch16_224", "convnext_tiny",
                "mobilenetv3_small_050", "lcnet_035")


def model_kwargs(arch: str, size: int = SIZE) -> dict:
    """timm keyword arguments: 10 classes, and ``img_size`` for ViTs."""
    return {"num_classes": 10, **({"img_size": size} if arch.startswith("vit_") else {})}


def build(arch: str, size: int = SIZE, seed: int = 0) -> torch.nn.Module:
    """The timm model with random init (``torch.manual_seed(seed)``), eval mode."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, **model_kwargs(arch, size)).eval()


def fmnist_images(n: int, size: int = SIZE, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of ``train`` or ``t10k``: ``(n, 3, size, size)`` float32 in [0, 1], ``(n,)`` int64."""
    x = read_idx(DATA / f"{split}-images-idx3-ubyte.gz")[:n].astype(np.float32) / 255.0
    y = read_idx(DATA / f"{split}-labels-idx1-ubyte.gz")[:n].astype(np.int64)
    t = torch.from_numpy(x.copy())[:, None]
    if size != t.shape[-1]:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(y.copy())


def write_case(arch: str, folder: Path, n: int = 256, size: int = SIZE) -> tuple[Path, Path, Path]:
    """Write ``ARCH.safetensors``, ``cal.safetensors`` and ``hold.safetensors`` into ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    ckpt, cal, hold = folder / f"{arch}.safetensors", folder / f"cal{n}_{size}.safetensors", folder / f"hold{n}_{size}.safetensors"
    model = build(arch, size)
    meta = {"format": "pt", "arch": arch, "model_kwargs": json.dumps(model_kwargs(arch, size))}
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(ckpt), metadata=meta)
    for path, split in ((cal, "train"), (hold, "t10k")):
        if not path.exists():
            x, y = fmnist_images(n, size, split)
            save_file({"inputs": x, "targets": y}, str(path))
    return ckpt, cal, hold
