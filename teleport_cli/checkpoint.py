"""Reading and writing checkpoint files: the only module that touches weight files.

Safetensors files carry string metadata; teleport-cli reads the model's architecture from it
(``arch``, ``model_kwargs`` as JSON, ``data_config`` as JSON) and writes its own provenance
(``teleport`` settings, ``verification`` figures, hashes). Writes are atomic: the file is written
beside the target, flushed to disk, then renamed into place; an input is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import InputError, OutputError


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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_tensor_file(path: str | Path, *, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, on the CPU.

    Raises:
        InputError: the file is missing, unreadable, not safetensors or truncated.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} file {path} does not exist", hint="check the path")
    if not p.is_file():
        raise InputError(f"{what} path {path} is not a file", hint="pass a .safetensors file")
    if p.suffix != ".safetensors":
        raise InputError(
            f"{what} file {path} is not a .safetensors file",
            hint="teleport-cli reads safetensors files; convert with safetensors.torch.save_file",
        )
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except PermissionError:
        raise InputError(f"{what} file {path} cannot be read (permission denied)", hint="check its permissions") from None
    except Exception as e:  # safetensors raises its own error types for corrupt or truncated files
        msg = " ".join(str(e).split()) or type(e).__name__
        raise InputError(f"{what} file {path} is not a readable safetensors file: {msg}", hint="is it truncated or corrupted?") from None
    return tensors, metadata


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a safetensors checkpoint with its metadata and the SHA-256 of the file."""
    tensors, metadata = read_tensor_file(path, what="checkpoint")
    if not tensors:
        raise InputError(f"checkpoint {path} holds no tensors", hint="is it the right file?")
    return Checkpoint(str(path), tensors, metadata, sha256_file(path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(output: str | Path, inputs: list[str | Path], force: bool) -> Path:
    """Validate an output path before any work is done.

    Raises:
        OutputError: the output is one of the inputs (also through a link), exists without
            ``force``, is a folder, or its folder does not exist or is not writable.
    """
    out = Path(output)
    for i in inputs:
        if i is not None and (_same_file(out, Path(i)) or out.resolve() == Path(i).resolve()):
            raise OutputError(f"output {output} is the input file {i}", hint="teleport-cli never writes over an input; choose another -o")
    if out.is_dir():
        raise OutputError(f"output {output} is a folder", hint="pass a file path ending in .safetensors")
    if out.exists() and not force:
        raise OutputError(f"output {output} already exists", hint="pass --force to replace it, or choose another -o")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist", hint=f"create it first: mkdir -p {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable", hint="choose another -o or fix the permissions")
    if out.suffix != ".safetensors":
        raise OutputError(f"output {output} must end in .safetensors", hint="the output is written as safetensors")
    return out


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (temporary file beside it, fsync, rename).

    Raises:
        OutputError: a tensor holds NaN or Inf (nothing is written), or the write fails.
    """
    bad = [k for k, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise OutputError(f"refusing to write NaN or Inf in {', '.join(bad)}", hint="this is a bug in the teleport; please report it")
    out = Path(path)
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in state_dict.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        raise OutputError(f"could not write {path}: {e.strerror or e}", hint="check free disk space and permissions") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
