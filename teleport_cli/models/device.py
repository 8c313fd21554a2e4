"""The device a run computes on."""

from __future__ import annotations

import os

import torch

from ..errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; under torchrun (``LOCAL_RANK``
    set) ``cuda`` is ``cuda:LOCAL_RANK``.

    Raises:
        ConfigError: ``cuda`` asked for on a machine without a usable GPU (exit 2).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available", hint="use --device cpu or auto")
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process on a node
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)
