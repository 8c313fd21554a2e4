"""Calibration and held-out sets: tensor files, seeded splits, and batching.

A tensor file is a safetensors file with two tensors: ``inputs`` (``N x ...``, float, already
preprocessed the way the model expects) and ``targets`` (``N``, integer class indices; a column
``N x 1``, as label arrays often are stored, is read as ``N``).
Image folders and token files: :mod:`teleport_cli.data.images`, :mod:`teleport_cli.data.tokens`;
which one a path is: :mod:`teleport_cli.data.sources`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..checkpoints.tensor_files import read_tensor_file
from ..errors import InputError


@dataclass(frozen=True)
class TensorData:
    """An in-memory data set: ``inputs`` (``N x ...`` float) and ``targets`` (``N`` int64)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.targets.shape[0]:
            raise InputError(
                f"{self.source}: 'inputs' has {self.inputs.shape[0]} samples but 'targets' has {self.targets.shape[0]}",
                hint="both tensors need the same first dimension",
            )

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, index: torch.Tensor, source: str | None = None) -> "TensorData":
        return TensorData(self.inputs[index], self.targets[index], source or self.source)

    def sha256(self) -> str:
        """SHA-256 over the raw bytes of inputs and targets (identifies the exact samples used)."""
        h = hashlib.sha256()
        for t in (self.inputs, self.targets):
            h.update(str(tuple(t.shape)).encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> "Batches":
        return Batches(self, batch_size, torch.device(device))


@dataclass(frozen=True)
class Batches:
    """A re-iterable, fixed-order stream of ``(inputs, targets)`` batches on a device."""

    data: TensorData
    batch_size: int
    device: torch.device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.data), self.batch_size):
            yield (
                self.data.inputs[i : i + self.batch_size].to(self.device),
                self.data.targets[i : i + self.batch_size].to(self.device),
            )

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)


def as_tensor_data(data, source: str = "<memory>") -> TensorData:
    """Accept a TensorData or an ``(inputs, targets)`` pair."""
    if isinstance(data, TensorData):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return TensorData(torch.as_tensor(data[0]), torch.as_tensor(data[1]).long(), source)
    raise InputError(f"cannot use {type(data).__name__} as a data set", hint="pass (inputs, targets) tensors")


def load_tensor_data(path: str | Path, *, what: str = "data") -> TensorData:
    """Read a safetensors file with ``inputs`` and ``targets``.

    ``targets`` of shape ``N x 1`` are squeezed to ``N``.

    Raises:
        InputError: missing/unreadable file, missing tensors, no samples, non-finite inputs,
            non-integer targets.
    """
    tensors, _ = read_tensor_file(path, what=what)
    return tensor_data_from(tensors, path, what=what)


def tensor_data_from(tensors: dict[str, torch.Tensor], path: str | Path, *, what: str = "data") -> TensorData:
    """The checks of :func:`load_tensor_data` on tensors already read from ``path``."""
    missing = [k for k in ("inputs", "targets") if k not in tensors]
    if missing:
        raise InputError(
            f"{what} file {path} has no tensor named {', '.join(repr(m) for m in missing)} (found: {', '.join(sorted(tensors)) or 'none'})",
            hint="a data file is a safetensors file with 'inputs' (N x ...) and 'targets' (N)",
        )
    inputs, targets = tensors["inputs"], tensors["targets"]
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise InputError(f"{what} file {path} holds no samples (found 0, need at least 1)")
    if not inputs.is_floating_point():
        raise InputError(
            f"{what} file {path}: 'inputs' are {inputs.dtype}, not floating point",
            hint="store the inputs preprocessed as the model expects (float32), e.g. images scaled and normalised",
        )
    if not torch.isfinite(inputs).all():
        bad = int((~torch.isfinite(inputs)).reshape(inputs.shape[0], -1).any(1).sum())
        raise InputError(f"{what} file {path} has NaN or Inf in 'inputs' ({bad} samples)", hint="clean or drop those samples")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise InputError(f"{what} file {path}: 'targets' must hold integer class indices, not {targets.dtype}")
    if targets.ndim == 2 and targets.shape[1] == 1:  # a column of labels: one class index per sample
        targets = targets[:, 0]
    return TensorData(inputs.float(), targets.long(), str(path))


def split_holdout(data: TensorData, fraction: float, seed: int) -> tuple[TensorData, TensorData, list[int]]:
    """Set aside a seeded ``fraction`` of ``data`` as held-out set.

    Returns:
        (calibration, holdout, holdout_indices) with indices into ``data`` in sorted order.

    Raises:
        InputError: fewer than 2 samples (nothing to split).
    """
    n = len(data)
    k = int(round(n * fraction))
    if n < 2 or k < 1 or k >= n:
        need = next(m for m in range(2, 10**6) if 1 <= int(round(m * fraction)) < m)
        raise InputError(
            f"{data.source} has {n} samples: too few to set aside {fraction:.0%} as held-out set"
            f" (requested {fraction:.0%} held-out and the rest for calibration: needs at least {need} samples, found {n})",
            hint="pass --holdout DATA or use a larger calibration set",
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    hold = perm[:k].sort().values
    cal = perm[k:].sort().values
    return data.subset(cal), data.subset(hold, data.source + " (held-out split)"), hold.tolist()
