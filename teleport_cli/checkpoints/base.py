"""What every container reader returns, and the key and tensor rules they share.

A checkpoint is read into a :class:`LoadedCheckpoint`: one or more named state dicts
(:class:`WeightSet`: ``state_dict``, and ``state_dict_ema`` in training checkpoints), string
metadata (``arch``, ``model_kwargs``, ``data_config`` when the container says), the other
entries of a training checkpoint (epoch, optimizer, scheduler, scaler, args), and a
:class:`Container` that tells the writer how to write the same container back.

Keys are kept as stored; each also has a canonical name with the wrapper prefixes that
DataParallel (``module.``) and torch.compile (``_orig_mod.``) add removed, so that it matches the
bare model's ``state_dict`` keys. The writer always writes the stored names.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError

COMPILE_PREFIX = "_orig_mod"
PARALLEL_PREFIX = "module"


@dataclass(frozen=True)
class Container:
    """How a checkpoint is stored, as much as the writer needs to store it the same way.

    Attributes:
        kind: ``safetensors`` (one file), ``sharded`` (folder with
            ``model.safetensors.index.json``), ``hf`` (Hugging Face style folder with
            ``config.json``) or ``torch`` (a ``torch.save`` pickle).
        is_dir: whether the checkpoint is a folder (written with folder replacement).
        layout: kind-specific details (shard of each key, file names, top-level structure).
    """

    kind: str
    is_dir: bool
    layout: dict = field(default_factory=dict)


@dataclass
class WeightSet:
    """One state dict inside a checkpoint.

    Attributes:
        name: where it sits (``state_dict``, ``state_dict_ema``, ...).
        tensors: stored key -> tensor exactly as read (dtype, strides and storage sharing kept).
        canonical: stored key -> canonical key (wrapper prefixes removed).
    """

    name: str
    tensors: dict[str, torch.Tensor]
    canonical: dict[str, str]

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor], source: str) -> "WeightSet":
        """Build a set and its canonical names.

        Raises:
            InputError: a value is not a tensor, or two stored keys map to one canonical key.
        """
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise InputError(f"{source}: {name} holds entries that are not tensors: {', '.join(map(str, bad[:8]))}")
        canon = canonical_keys(list(tensors))
        seen: dict[str, str] = {}
        for k, c in canon.items():
            if c in seen:
                raise InputError(f"{source}: {name} keys {seen[c]!r} and {k!r} both mean {c!r}", hint="the state dict mixes wrapped and bare keys")
            seen[c] = k
        return cls(name, dict(tensors), canon)

    def by_canonical(self) -> dict[str, torch.Tensor]:
        return {self.canonical[k]: t for k, t in self.tensors.items()}


@dataclass
class LoadedCheckpoint:
    """A checkpoint as read from disk.

    Attributes:
        path: the path given.
        container: how it is stored.
        metadata: string metadata found (``arch``, ``model_kwargs`` JSON, ``data_config`` JSON,
            earlier teleport provenance); possibly empty: then the model must come from flags.
        sha256: SHA-256 of the file, or of the folder's files (names and contents).
        weights: name -> state dict, the one to teleport by default first (``state_dict``).
        entries: the other top-level entries of a training checkpoint, in stored order, with
            the weight sets' positions held by their names.
    """

    path: str
    container: Container
    metadata: dict[str, str]
    sha256: str
    weights: dict[str, WeightSet]
    entries: dict[str, object] = field(default_factory=dict)

    @property
    def ema_name(self) -> str | None:
        return next((n for n in self.weights if "ema" in n), None)


def canonical_keys(keys: list[str]) -> dict[str, str]:
    """Stored key -> key without wrapper prefixes.

    ``_orig_mod`` path components are removed wherever they occur (torch.compile wraps any
    module in an OptimizedModule whose only child is ``_orig_mod``). Leading ``module``
    components are removed while every key has one at that position (DataParallel and
    DistributedDataParallel wrap the whole model), in any order and nesting with ``_orig_mod``.
    A ``module`` component deeper in the path (a wrapped submodule) is matched against the
    model later, by :func:`align_to_model`.
    """
    parts = {k: [p for p in k.split(".") if p != COMPILE_PREFIX] for k in keys}
    while parts and all(len(p) > 1 and p[0] == PARALLEL_PREFIX for p in parts.values()):
        parts = {k: p[1:] for k, p in parts.items()}
    return {k: ".".join(p) for k, p in parts.items()}


def align_to_model(state: dict[str, torch.Tensor], model_keys: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename keys that match a model key once their inner ``module`` components are removed.

    Returns:
        (state with renamed keys, old canonical -> new canonical for the renamed ones).
    """
    renames = {}
    for k in state:
        if k in model_keys:
            continue
        bare = ".".join(p for p in k.split(".") if p != PARALLEL_PREFIX)
        if bare in model_keys and bare not in state:
            renames[k] = bare
    if len(set(renames.values())) != len(renames):
        return state, {}
    return {renames.get(k, k): v for k, v in state.items()}, renames


def alias_groups(tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    """Groups of stored keys that are views of the same memory (tied or shared tensors).

    Two keys are tied when their tensors share storage, offset, shape and strides, as
    ``torch.save`` keeps them. Returns only groups of two or more, in stored order.
    """
    groups: dict[tuple, list[str]] = {}
    for k, t in tensors.items():
        if t.numel() == 0:
            continue
        sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        groups.setdefault(sig, []).append(k)
    return [g for g in groups.values() if len(g) > 1]


def nonfinite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Keys of floating-point tensors holding NaN or Inf."""
    return [k for k, t in tensors.items() if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]


def nan_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Keys of floating-point tensors holding NaN."""
    return [k for k, t in tensors.items() if (t.is_floating_point() or t.is_complex()) and bool(torch.isnan(t).any())]


def check_finite(ws: WeightSet, source: str) -> None:
    """Raises InputError when a tensor of the set holds NaN (listing them).

    ±Inf is not refused here: a buffer may hold it (a causal mask ``triu(full(-inf), 1)``).
    Which keys are parameters is known once the model is built; then
    :func:`teleport_cli.models.loading.load_weights` refuses Inf in parameters.
    """
    bad = nan_keys(ws.tensors)
    if bad:
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise InputError(
            f"{source}: {ws.name} has NaN in {', '.join(bad[:8])}{more}",
            hint="a checkpoint with NaN weights or buffers cannot be teleported; use an earlier one",
        )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_folder(path: str | Path) -> str:
    """Hex SHA-256 over the relative names and SHA-256s of all files in a folder, sorted.

    Raises:
        InputError: a link or special file that :func:`folder_files` refuses.
    """
    root = Path(path)
    h = hashlib.sha256()
    for rel in folder_files(root):
        h.update(str(rel).encode() + b"\0" + sha256_file(root / rel).encode() + b"\n")
    return h.hexdigest()


LINK_HINT = ("teleport-cli follows a link only to a regular file inside the checkpoint folder, or inside the "
             "blobs/ folder of the Hugging Face cache the folder is a snapshot of; copy the file in or remove the link")


def _hf_blobs(root: Path) -> Path | None:
    """``.../models--NAME/blobs`` when ``root`` (resolved) is ``.../models--NAME/snapshots/REV``."""
    return root.parent.parent / "blobs" if root.parent.name == "snapshots" else None


IMAGE_LINK_HINT = "teleport-cli follows a link in an image folder only to a regular file inside it; copy the file in or remove the link"


def _check_link(path: Path, rel: Path, root: Path, source: str, kind: str = "checkpoint folder", hf_cache: bool = True) -> None:
    hint = LINK_HINT if hf_cache else IMAGE_LINK_HINT
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InputError(f"{kind} {source}: {rel} is a link to a missing file or a link loop", hint=hint) from None
    blobs = _hf_blobs(root) if hf_cache else None
    inside = target.is_relative_to(root) or (blobs is not None and target.is_relative_to(blobs.resolve()))
    if not inside:
        raise InputError(f"{kind} {source}: {rel} is a link to {target}, outside the folder", hint=hint)
    if not stat.S_ISREG(os.stat(target).st_mode):
        raise InputError(f"{kind} {source}: {rel} is a link to {target}, which is not a regular file", hint=hint)


def folder_files(folder: str | Path, source: str | None = None, *, kind: str = "checkpoint folder", hf_cache: bool = True) -> list[Path]:
    """The files of a checkpoint folder (relative paths, sorted), every link checked first.

    A regular file is listed. A symbolic link is listed only when its target is a regular file
    inside the folder, or inside ``models--NAME/blobs`` when the folder is a Hugging Face cache
    snapshot ``models--NAME/snapshots/REV`` (whose files are links ``../../blobs/SHA``). Links
    to folders are not followed. ``kind`` names the folder in errors; ``hf_cache=False`` (image
    folders) allows no target outside the folder at all.

    Raises:
        InputError: a link to anything else (outside the folder, a folder, a missing file, a
            loop), or an entry that is neither a file, a folder nor a link (FIFO, socket, device).
    """
    root = Path(folder).resolve()
    source = str(folder) if source is None else source
    files = []
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: links to folders are in dirnames
        here = Path(dirpath)
        for name in dirnames + filenames:
            p = here / name
            rel = p.relative_to(root)
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                _check_link(p, rel, root, source, kind, hf_cache)
                files.append(rel)
            elif stat.S_ISREG(mode):
                files.append(rel)
            elif not stat.S_ISDIR(mode):
                raise InputError(f"{kind} {source}: {rel} is not a regular file", hint=f"remove it; a {kind} holds files and folders only")
    return sorted(files)


def one_line(err: BaseException) -> str:
    """An exception's message squeezed onto one line (terminal colour codes removed)."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split()) or type(err).__name__
