"""A small facade over :mod:`teleport_cli.checkpoints.containers` for callers that want one state dict.

:func:`load_checkpoint` reads any supported container as one state dict with its metadata;
:func:`read_tensor_file` reads safetensors data files; :func:`save_checkpoint` writes one
safetensors file atomically. Writing a checkpoint back in its own container (training
checkpoints, sharded and Hugging Face folders) is :func:`teleport_cli.checkpoints.containers.write_checkpoint`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError, OutputError
from .atomic import check_output, write_file_atomic
from .base import nonfinite_keys, sha256_file  # noqa: F401  (re-exported)
from .containers import read_checkpoint
from .single import read_safetensors, write_safetensors


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: ``state_dict`` (name -> tensor), string ``metadata``, source hash."""

    path: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""

    def json_field(self, key: str, default=None):
        """A metadata entry parsed as JSON (``default`` when absent).

        Raises:
            InputError: the entry is not valid JSON.
        """
        if key not in self.metadata:
            return default
        try:
            return json.loads(self.metadata[key])
        except json.JSONDecodeError as e:
            raise InputError(f"{self.path}: metadata entry {key!r} is not valid JSON ({e.msg})") from None


def read_tensor_file(path: str | Path, *, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, on the CPU (data files).

    Raises:
        InputError: the file is missing, unreadable, not safetensors or truncated.
    """
    p = Path(path)
    if p.exists() and p.is_file() and p.suffix != ".safetensors":
        raise InputError(
            f"{what} file {path} is not a .safetensors file",
            hint="teleport-cli reads safetensors files; convert with safetensors.torch.save_file",
        )
    return read_safetensors(path, what=what)


def load_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Load any supported checkpoint (see :mod:`teleport_cli.checkpoints.containers`) as one state dict.

    The state dict is the weights training resumes from (``state_dict`` of a training
    checkpoint), keyed without ``module.``/``_orig_mod.`` wrapper prefixes.

    Raises:
        InputError: see :func:`teleport_cli.checkpoints.containers.read_checkpoint`.
    """
    loaded = read_checkpoint(path, trust_pickle=trust_pickle)
    return Checkpoint(str(path), next(iter(loaded.weights.values())).by_canonical(), loaded.metadata, loaded.sha256)


def check_output_path(output: str | Path, inputs: list[str | Path], force: bool) -> Path:
    """Validate a ``.safetensors`` output file path before any work is done.

    Raises:
        OutputError: the output is one of the inputs (also through a link), exists without
            ``force``, is a folder, or its folder does not exist or is not writable.
    """
    return check_output(output, inputs, force)


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], *, force: bool = False) -> None:
    """Write a safetensors file atomically (temporary file beside it, fsync, rename); an existing
    file is replaced only with ``force``.

    Raises:
        OutputError: a tensor holds NaN or Inf (nothing is written), something is at ``path``
            (without ``force``), or the write fails.
    """
    bad = nonfinite_keys(state_dict)
    if bad:
        raise OutputError(f"refusing to write NaN or Inf in {', '.join(bad)}", hint="this is a bug in the teleport; please report it")
    write_file_atomic(path, lambda tmp: write_safetensors(tmp, state_dict, metadata), force=force)
