"""Checkpoint containers as users have them: read one, write the same one back.

=============  ==============================================  ===============================
container      read from                                       written as
=============  ==============================================  ===============================
safetensors    one ``.safetensors`` file                       one ``.safetensors`` file
sharded        folder with ``model.safetensors.index.json``    same shards, fresh index
hf             folder with ``config.json`` (timm save_for_hf)  same files, config.json kept
torch          ``.pt``/``.pth``/``.bin``/``.pth.tar`` pickle    same structure and entries
=============  ==============================================  ===============================

:func:`read_checkpoint` returns a :class:`LoadedCheckpoint`; :func:`write_checkpoint` writes new
weight sets and entries in the input's container, atomically, after refusing NaN or Inf.
This package (with :mod:`teleport_cli.checkpoints.tensor_files`) is the only importer of safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError, OutputError
from . import hf, sharded, single, torchfile
from .atomic import PICKLE_SUFFIXES, check_output
from .base import (
    Container,
    LoadedCheckpoint,
    WeightSet,
    alias_groups,
    align_to_model,
    canonical_keys,
    nonfinite_keys,
)

__all__ = [
    "Container", "LoadedCheckpoint", "WeightSet", "alias_groups", "align_to_model", "canonical_keys",
    "check_output_for", "detect", "read_checkpoint", "write_checkpoint",
]

READERS = {single.KIND: single, sharded.KIND: sharded, hf.KIND: hf, torchfile.KIND: torchfile}
ZIP_MAGIC = b"PK\x03\x04"


def detect(path: str | Path) -> str:
    """The container kind of ``path`` (see the module table).

    Raises:
        InputError: the path does not exist or is no known container.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"checkpoint {path} does not exist", hint="check the path")
    if p.is_dir():
        if (p / hf.CONFIG).is_file():
            return hf.KIND
        if (p / sharded.INDEX).is_file():
            return sharded.KIND
        raise InputError(f"checkpoint folder {path} has neither {hf.CONFIG} nor {sharded.INDEX}", hint="pass a checkpoint file or a Hugging Face style folder")
    name = p.name.lower()
    if name.endswith(".safetensors"):
        return single.KIND
    if name.endswith(PICKLE_SUFFIXES):
        return torchfile.KIND
    with open(p, "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC:
        return torchfile.KIND
    raise InputError(
        f"checkpoint {path} is of an unknown kind",
        hint="pass a .safetensors, .pt/.pth/.bin/.pth.tar file, or a folder with config.json or model.safetensors.index.json",
    )


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> LoadedCheckpoint:
    """Read any supported checkpoint on the CPU.

    Args:
        trust_pickle: unpickle ``torch.save`` files without the weights-only restriction
            (runs code from the file: only for files from a trusted source).

    Raises:
        InputError (exit 3): missing, unknown, truncated, corrupted or inconsistent
            checkpoint, a pickle needing unsafe globals, NaN or Inf in the weights.
    """
    kind = detect(path)
    if kind in (torchfile.KIND, hf.KIND):
        return READERS[kind].read(path, trust_pickle=trust_pickle)
    return READERS[kind].read(path)


def check_output_for(ckpt: LoadedCheckpoint, output: str | Path, inputs: list, force: bool) -> Path:
    """:func:`.atomic.check_output` with the container's kind (folder or file, file ending)."""
    c = ckpt.container
    suffixes = (".safetensors",) if c.kind == single.KIND else PICKLE_SUFFIXES
    return check_output(output, inputs, force, is_dir=c.is_dir, suffixes=suffixes)


def write_checkpoint(
    ckpt: LoadedCheckpoint,
    out: str | Path,
    sets: dict[str, dict[str, torch.Tensor]],
    entries: dict,
    metadata: dict[str, str],
    *,
    force: bool = False,
) -> None:
    """Write ``sets`` (name -> stored key -> tensor) and ``entries`` in ``ckpt``'s container.

    ``force``: replace what is at ``out``; without it nothing is replaced, also not an output
    another process created meanwhile (:mod:`.publish`).

    Raises:
        OutputError (exit 6): a tensor the teleport produced holds NaN or Inf (nothing is
            written; tensors written as read may hold ±Inf), a key set differs from the
            input's, something is at ``out`` (without ``force``), or the write fails.
    """
    for name, tensors in sets.items():
        given = ckpt.weights[name].tensors if name in ckpt.weights else {}
        # a tensor written as read (a buffer holding -inf, e.g. a causal mask) passed the reader's checks
        bad = [k for k in nonfinite_keys(tensors) if tensors[k] is not given.get(k)]
        if bad:
            raise OutputError(f"refusing to write NaN or Inf in {name}: {', '.join(bad[:8])}", hint="this is a bug; please report it")
        if name in ckpt.weights and set(tensors) != set(ckpt.weights[name].tensors):
            raise OutputError(f"refusing to write {name} with other keys than the input's", hint="this is a bug; please report it")
    READERS[ckpt.container.kind].write(ckpt, Path(out), sets, entries, {k: str(v) for k, v in metadata.items()}, force=force)
