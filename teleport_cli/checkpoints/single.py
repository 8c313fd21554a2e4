"""One ``.safetensors`` file: tensors plus string metadata (the format's own header).

The metadata may name the architecture (``arch``, ``model_kwargs`` JSON); without it the
model has to come from the command line. Reading checks the header and the file size (a
truncated or corrupted file is an InputError, never a crash); writing is atomic.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import InputError
from .atomic import as_write_error, write_file_atomic
from .base import (
    Container,
    LoadedCheckpoint,
    WeightSet,
    check_finite,
    one_line,
    sha256_file,
)

KIND = "safetensors"


def read_safetensors(path: str | Path, *, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, on the CPU.

    Raises:
        InputError: the file is missing, unreadable, not safetensors, truncated or corrupted.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} file {path} does not exist", hint="check the path")
    if not p.is_file():
        raise InputError(f"{what} path {path} is not a file", hint="pass a .safetensors file")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except PermissionError:
        raise InputError(f"{what} file {path} cannot be read (permission denied)", hint="check its permissions") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # safetensors raises its own types (and a Rust panic is a BaseException)
        raise InputError(f"{what} file {path} is not a readable safetensors file: {one_line(e)}", hint="is it truncated or corrupted?") from None
    return tensors, metadata


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors (made contiguous: channels_last and other strided tensors are stored by
    their logical values, as safetensors requires) and string metadata to ``path``.

    Not atomic by itself: callers write to a temporary path (see :mod:`.atomic`).

    Raises:
        OSError: the write failed (safetensors' own error type turned into ``ENOSPC`` on a full
            disk, else ``EIO``: :func:`.atomic.as_write_error`).
    """
    flat = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    try:
        save_file(flat, str(path), metadata={k: str(v) for k, v in metadata.items()})
    except SafetensorError as e:
        raise as_write_error(e, path) from None


def read(path: str | Path) -> LoadedCheckpoint:
    """Read a single-file safetensors checkpoint.

    Raises:
        InputError: unreadable file, no tensors, NaN or Inf in a tensor.
    """
    tensors, metadata = read_safetensors(path)
    if not tensors:
        raise InputError(f"checkpoint {path} holds no tensors", hint="is it the right file?")
    ws = WeightSet.from_tensors("state_dict", tensors, str(path))
    check_finite(ws, str(path))
    return LoadedCheckpoint(str(path), Container(KIND, False), metadata, sha256_file(path), {"state_dict": ws})


def write(ckpt: LoadedCheckpoint, out: Path, sets: dict[str, dict[str, torch.Tensor]], entries: dict, metadata: dict[str, str], *, force: bool = False) -> None:
    """Write the state dict as one safetensors file, atomically (over an existing file only with ``force``)."""
    write_file_atomic(out, lambda tmp: write_safetensors(tmp, sets["state_dict"], metadata), force=force)
