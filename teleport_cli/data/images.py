"""Image folders in the class-subfolder layout, preprocessed with timm's own eval transforms.

``ROOT/<class name>/<image file>``: one subfolder per class. Class indices follow the
checkpoint's ``data_config["class_names"]`` when it has them (every subfolder must be one of
them), otherwise the sorted subfolder names (as ``torchvision.datasets.ImageFolder``).

Preprocessing is ``timm.data.create_transform(**resolve_data_config(args), is_training=False)``
(resize to ``input_size / crop_pct``, centre crop, which pads with zeros when the crop is
larger than the image, to tensor, normalise with mean and std). ``args`` are the checkpoint's
stored ``data_config`` entries (``input_size`` as ``[C, H, W]``, ``mean``, ``std``, ``crop_pct``,
``interpolation``, ``crop_mode``): they win over timm's default configuration of the
architecture, which for the ``test_*`` models says 160-pixel RGB whatever the model was trained
on. Entries the metadata lacks fall back to timm's defaults for the model, and the resolved
channel count must match the model's first convolution.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.base import folder_files
from ..errors import InputError
from .tensors import TensorData

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TIMM_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")


def _first_conv_channels(model: nn.Module | None) -> int | None:
    if model is None:
        return None
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    return None


def resolve_image_config(data_config: dict | None, model: nn.Module | None = None, source: str = "data") -> dict:
    """The timm data config for an image folder: stored entries first, timm's defaults for the rest.

    Args:
        data_config: the checkpoint's ``data_config`` metadata (may be empty or None).
        model: the model (timm's ``pretrained_cfg`` supplies missing entries; its first
            convolution's ``in_channels`` is checked against the resolved channels).

    Returns:
        ``{"input_size": (C, H, W), "interpolation", "mean", "std", "crop_pct", "crop_mode"}``.

    Raises:
        InputError: ``input_size`` is not ``[C, H, W]``, mean/std do not fit C, nothing to
            resolve from, or the channels do not match the model.
    """
    from timm.data import resolve_data_config

    args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (data_config or {}).items() if k in TIMM_KEYS}
    size = args.get("input_size")
    if size is not None and len(size) != 3:
        raise InputError(
            f"{source}: the checkpoint's data_config input_size {list(size)} is not [C, H, W]",
            hint="image folders need an image model; pass a tensor file for other inputs",
        )
    has_cfg = bool(getattr(model, "pretrained_cfg", None))
    if not args and not has_cfg:
        raise InputError(
            f"{source}: an image folder needs a data_config (input_size, mean, std) in the checkpoint's metadata",
            hint="store data_config in the checkpoint, or pass preprocessed inputs as a tensor file",
        )
    try:
        cfg = resolve_data_config(args, model=model if has_cfg else None)
    except AssertionError:
        raise InputError(f"{source}: data_config mean/std do not have one entry or one per channel of input_size {list(size or [])}") from None
    channels = _first_conv_channels(model)
    if channels is not None and channels != cfg["input_size"][0]:
        origin = "the checkpoint's data_config" if size is not None else "timm's default config for this architecture"
        raise InputError(
            f"{source}: {origin} says {cfg['input_size'][0]}-channel input of size {tuple(cfg['input_size'])}, "
            f"but the model's first convolution takes {channels} channels",
            hint="store data_config (input_size [C, H, W], mean, std) in the checkpoint's metadata",
        )
    return cfg


def scan_image_folder(root: str | Path, class_names: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """All image files under ``root/<class>/`` with their class index, in sorted order.

    Returns:
        (samples as (path, class index), class names in index order).

    Links are checked first, by the rule of checkpoint folders
    (:func:`teleport_cli.checkpoints.base.folder_files`): a link is followed only when its target
    is a regular file inside ``root``; a link to a folder (also a class folder), outside
    ``root``, to a missing file or a loop, and any special file (FIFO, socket, device) is an error
    naming it.

    Raises:
        InputError: such a link or special file, no subfolders, a subfolder not in
            ``class_names``, or no images.
    """
    root = Path(root)
    files = folder_files(root, str(root), kind="image folder", hf_cache=False)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    if not folders:
        raise InputError(f"image folder {root} has no class subfolders", hint="lay it out as ROOT/<class>/<image>")
    classes = list(class_names) if class_names else folders
    unknown = [f for f in folders if f not in classes]
    if unknown:
        raise InputError(
            f"image folder {root} has subfolders that are not classes of the checkpoint: {', '.join(unknown[:5])}",
            hint=f"the classes are: {', '.join(classes)}",
        )
    index = {c: i for i, c in enumerate(classes)}
    within = {folder: [] for folder in folders}
    for rel in files:  # sorted; links among them lead to regular files inside root
        if len(rel.parts) > 1 and rel.parts[0] in within and rel.suffix.lower() in IMAGE_EXTENSIONS:
            within[rel.parts[0]].append(root / rel)
    samples = [(f, index[folder]) for folder in folders for f in within[folder]]
    if not samples:
        raise InputError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return samples, classes


def load_image_folder(root: str | Path, data_config: dict | None, model: nn.Module | None = None, *, what: str = "data") -> tuple[TensorData, dict]:
    """Load and preprocess every image of a class-subfolder tree.

    Returns:
        (data, resolved timm config): ``inputs`` ``(N, C, H, W)`` float32, ``targets`` ``(N,)``
        int64.

    Raises:
        InputError: see :func:`resolve_image_config` and :func:`scan_image_folder`; an
            unreadable image; a decompression bomb (more pixels than PIL's
            ``Image.MAX_IMAGE_PIXELS``, about 89 million: its ``DecompressionBombWarning`` is an
            error here, like the ``DecompressionBombError`` beyond twice that).
    """
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform

    cfg = resolve_image_config(data_config, model, f"{what} folder {root}")
    samples, _ = scan_image_folder(root, (data_config or {}).get("class_names"))
    channels = cfg["input_size"][0]
    if channels not in (1, 3):
        raise InputError(f"{what} folder {root}: images can be loaded as 1 (L) or 3 (RGB) channels, not {channels}")
    mode = "L" if channels == 1 else "RGB"
    transform = create_transform(**cfg, is_training=False)
    xs = []
    for path, _ in samples:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    xs.append(transform(img.convert(mode)))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(f"{what} image {path} is a decompression bomb ({e})",
                             hint=f"calibration images need at most {Image.MAX_IMAGE_PIXELS} pixels; remove or shrink the file") from None
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"{what} image {path} cannot be read ({e})", hint="remove or replace the file") from None
    targets = torch.tensor([label for _, label in samples], dtype=torch.int64)
    resolved = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    return TensorData(torch.stack(xs).float(), targets, str(root)), resolved
