"""The device a run computes on."""

from __future__ import annotations

import torch

from ..errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``.

    Raises:
        ConfigError: ``cuda`` asked for on a machine without a usable GPU (exit 2).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available", hint="use --device cpu or auto")
    return torch.device(name)
