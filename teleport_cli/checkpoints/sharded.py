"""Sharded safetensors: a folder with ``model.safetensors.index.json`` and its shard files.

The index (``{"metadata": {"total_size": bytes}, "weight_map": {key: shard file}}``, the
layout of Hugging Face and timm) is cross-checked against the shards' headers both ways before
anything is used: every shard it names exists, every tensor it lists is in the shard it names,
and every tensor in a shard is listed for that shard. The writer keeps the shard file names and
each tensor's shard, writes a fresh index (``total_size`` recomputed), and copies every other
file of the folder unchanged; the folder is replaced atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import InputError
from .atomic import staged_folder
from .base import (
    Container,
    LoadedCheckpoint,
    WeightSet,
    check_finite,
    folder_files,
    sha256_folder,
)
from .single import read_safetensors, write_safetensors

KIND = "sharded"
INDEX = "model.safetensors.index.json"


def _list(items, n: int = 6) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def read_index(folder: Path, index_name: str = INDEX) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """Tensors, shard metadata and layout of a sharded checkpoint in ``folder``.

    Returns:
        (tensors, metadata, layout) with layout ``{"index": name, "shards": {key: file},
        "index_metadata": dict, "shard_metadata": {file: dict}}``.

    Raises:
        InputError: unreadable index, a missing shard, a tensor absent from its shard, a tensor
            in a shard but in no index entry, or an unreadable shard.
    """
    ipath = folder / index_name
    try:
        index = json.loads(ipath.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"index {ipath} is not a readable shard index: {type(e).__name__}: {e}", hint="it needs a 'weight_map' object") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (folder / f).is_file() or Path(f).name != f]
    if missing:
        raise InputError(f"{ipath} names shards that are not in {folder}: {_list(missing)}", hint="is the folder complete?")
    tensors: dict[str, torch.Tensor] = {}
    shard_meta: dict[str, dict] = {}
    problems = []
    for f in files:
        part, meta = read_safetensors(folder / f, what="shard")
        shard_meta[f] = meta
        listed = {k for k, v in weight_map.items() if v == f}
        absent = listed - set(part)
        extra = set(part) - listed
        if absent:
            problems.append(f"listed for {f} but not in it: {_list(absent)}")
        if extra:
            problems.append(f"in {f} but in no index entry for it: {_list(extra)}")
        tensors.update({k: t for k, t in part.items() if k in listed})
    if problems:
        raise InputError(f"{ipath} and its shards disagree: " + "; ".join(problems), hint="the index or a shard is stale or corrupted")
    metadata = next((m for m in shard_meta.values() if m.get("arch")), {})
    index_meta = index.get("metadata") or {}
    if isinstance(index_meta, dict) and index_meta.get("arch"):
        metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in index_meta.items() if k != "total_size"}
    layout = {"index": index_name, "shards": dict(weight_map), "index_metadata": index_meta, "shard_metadata": shard_meta}
    return tensors, dict(metadata), layout


def read(path: str | Path) -> LoadedCheckpoint:
    """Read a sharded folder (its links checked first: :func:`.base.folder_files`).

    Raises:
        InputError: a refused link or special file; see :func:`read_index`; NaN or Inf.
    """
    folder = Path(path)
    folder_files(folder, str(path))
    tensors, metadata, layout = read_index(folder)
    ws = WeightSet.from_tensors("state_dict", tensors, str(path))
    check_finite(ws, str(path))
    return LoadedCheckpoint(str(path), Container(KIND, True, layout), metadata, sha256_folder(folder), {"state_dict": ws})


def write_shards(folder: Path, layout: dict, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write shards and a fresh index into ``folder`` (each tensor in its original shard).

    The index's ``metadata`` holds ``total_size`` (bytes of all tensors) and the provenance
    entries; each shard keeps its own header metadata (``format``).
    """
    shards = layout["shards"]
    for f in sorted(set(shards.values())):
        part = {k: tensors[k] for k, v in shards.items() if v == f}
        write_safetensors(folder / f, part, dict(layout["shard_metadata"].get(f) or {"format": "pt"}))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_meta = {**{k: v for k, v in (layout["index_metadata"] or {}).items()}, **metadata, "total_size": total}
    body = {"metadata": index_meta, "weight_map": dict(sorted(shards.items()))}
    (folder / layout["index"]).write_text(json.dumps(body, indent=2) + "\n")


def copy_others(src: Path, dst: Path, written: set[str]) -> None:
    """Copy every file of ``src`` not in ``written`` (relative names) into ``dst``, as a regular file.

    The files are those :func:`.base.folder_files` lists (checked again here): a link allowed
    there is copied as the file it names, never as a link.

    Raises:
        InputError: a link or special file it refuses.
        OSError: a copy failed.
    """
    for rel in folder_files(src):
        if str(rel) not in written:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)


def write(ckpt: LoadedCheckpoint, out: Path, sets: dict[str, dict[str, torch.Tensor]], entries: dict, metadata: dict[str, str], *, force: bool = False) -> None:
    """Write the sharded folder beside ``out`` and move it into place (over an existing one only with ``force``)."""
    layout = ckpt.container.layout
    with staged_folder(out, force=force) as tmp:
        write_shards(tmp, layout, sets["state_dict"], metadata)
        copy_others(Path(ckpt.path), tmp, {layout["index"], *layout["shards"].values()})
