"""``torch.save`` pickles: plain state dicts (``.pt``, ``.pth``, ``.bin``) and training
checkpoints (timm's ``.pth.tar``: ``state_dict``, ``state_dict_ema``, ``optimizer``, ``args``,
``epoch``, ``arch``, an amp scaler, ...).

Unpickling runs code, so files are loaded with ``torch.load(weights_only=True)`` (PyTorch's
restricted unpickler) with only ``argparse.Namespace`` allowed beyond it (timm stores its
training arguments as one). A file that needs any other global is refused with every
offending global listed in one message (``torch.serialization.get_unsafe_globals_in_checkpoint``);
``--trust-pickle`` is the only way to load it anyway. There is never a silent fallback.

The written file has the same top-level structure: the same entries in the same order (minus
a dropped optimizer state), state dicts with their stored key names, dtypes, strides and
storage sharing (tied tensors stay tied), and an ``OrderedDict``'s ``_metadata`` (module
versions that ``load_state_dict`` uses) kept.
"""

from __future__ import annotations

import argparse
import json
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

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

KIND = "torch"
ALLOWED_GLOBALS = [argparse.Namespace]
WEIGHT_ENTRIES = ("state_dict", "model", "state_dict_ema", "model_ema")
OPTIMIZER_ENTRIES = ("optimizer", "optimizer_state_dict", "optimizer_states")  # timm, common scripts, Lightning
METADATA_ENTRY = "teleport_metadata"


def _allowed_names() -> set[str]:
    """Our allow-list, plus PyTorch's own weights-only list where this version exposes it."""
    names = {f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS}
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        names |= set(_get_allowed_globals())
    except (ImportError, AttributeError, TypeError):
        names |= {"collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.set", "builtins.bytearray", "builtins.complex"}
    return names


def _looks_like_safetensors(p: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then ``{``."""
    with open(p, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") + 8 <= p.stat().st_size


def load_pickle(path: str | Path, *, trust_pickle: bool = False):
    """Unpickle a ``torch.save`` file on the CPU, safely unless ``trust_pickle``.

    Raises:
        InputError: the file is missing, truncated or corrupted, or needs globals that the
            weights-only unpickler refuses (all listed; hint: ``--trust-pickle``).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"checkpoint {path} does not exist" if not p.exists() else f"checkpoint {path} is not a file", hint="check the path")
    if _looks_like_safetensors(p):
        raise InputError(f"checkpoint {path} is a safetensors file, not a torch.save pickle", hint="rename it to end in .safetensors")
    if trust_pickle:
        try:
            return torch.load(str(p), map_location="cpu", weights_only=False)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            raise InputError(f"checkpoint {path} could not be unpickled: {one_line(e)}", hint="is it truncated or corrupted?") from None
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(p)
        if unsafe:
            raise InputError(
                f"checkpoint {path} refers to code that a safe (weights-only) load refuses: {', '.join(unsafe)}",
                hint="if you trust where the file comes from, pass --trust-pickle to unpickle it anyway",
            ) from None
        raise InputError(f"checkpoint {path} cannot be loaded safely: {one_line(e)}", hint="if you trust the file, pass --trust-pickle") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise InputError(f"checkpoint {path} is not a readable torch.save file: {one_line(e)}", hint="is it truncated or corrupted?") from None


def _unsafe_globals(p: Path) -> list[str]:
    """Every global the file needs beyond the weights-only allow-list.

    Zip-format files (PyTorch >= 1.6) ask ``get_unsafe_globals_in_checkpoint``; legacy files
    (``_use_new_zipfile_serialization=False``) are several protocol-2 pickles in a row, whose
    ``GLOBAL`` opcodes are listed without running them (PyTorch's allowed globals and its
    ``torch.*`` rebuild helpers left out: only this message depends on it, not the refusal).
    """
    if zipfile.is_zipfile(p):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
        except Exception:
            return []
        return sorted(set(found) - _allowed_names())
    found = set()
    with open(p, "rb") as f:
        for _ in range(4):  # magic number, protocol version, system info, the object
            try:
                found |= {str(arg).replace(" ", ".") for op, arg, _ in pickletools.genops(f) if op.name == "GLOBAL"}
            except Exception:
                break
    allowed = _allowed_names()
    return sorted(g for g in found if not g.startswith("torch.") and g not in allowed)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _metadata_from(obj: dict, path: str = "checkpoint") -> dict[str, str]:
    """``arch``/``model_kwargs`` from a training checkpoint (timm's ``arch`` and ``args``),
    or the provenance a previous teleport stored.

    Raises:
        InputError: ``args.model_kwargs`` is not a dict, or holds values JSON cannot store.
    """
    meta: dict[str, str] = {}
    stored = obj.get(METADATA_ENTRY)
    if isinstance(stored, dict):
        meta.update({str(k): str(v) for k, v in stored.items()})
    args = obj.get("args")
    if isinstance(obj.get("arch"), str) and "arch" not in meta:
        meta["arch"] = obj["arch"]
    if isinstance(args, argparse.Namespace) and "model_kwargs" not in meta:
        raw = getattr(args, "model_kwargs", None) or {}
        if not isinstance(raw, dict):
            raise InputError(f"{path}: args.model_kwargs is a {type(raw).__name__}, not a dict of keyword arguments",
                             hint="pass the model's keyword arguments as --model-kwargs JSON (apply)")
        kwargs = dict(raw)
        for name in ("num_classes", "in_chans"):
            if getattr(args, name, None) is not None:
                kwargs.setdefault(name, getattr(args, name))
        try:
            meta["model_kwargs"] = json.dumps(kwargs)
        except (TypeError, ValueError) as e:
            raise InputError(f"{path}: the model arguments in args are not plain values ({e})",
                             hint="pass the model's keyword arguments as --model-kwargs JSON (apply)") from None
        if "arch" not in meta and isinstance(getattr(args, "model", None), str):
            meta["arch"] = args.model
    return meta


def read(path: str | Path, *, trust_pickle: bool = False) -> LoadedCheckpoint:
    """Read a plain state dict or a training checkpoint.

    Raises:
        InputError: unreadable or refused pickle, no state dict in it, NaN or Inf in a weight set.
    """
    obj = load_pickle(path, trust_pickle=trust_pickle)
    source = str(path)
    if _is_state_dict(obj):
        ws = WeightSet.from_tensors("state_dict", obj, source)
        check_finite(ws, source)
        layout = {"bare": True, "type": type(obj), "dict_metadata": getattr(obj, "_metadata", None)}
        return LoadedCheckpoint(source, Container(KIND, False, layout), {}, sha256_file(path), {"state_dict": ws})
    if not isinstance(obj, dict):
        raise InputError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict", hint="save model.state_dict(), not the model")
    weights: dict[str, WeightSet] = {}
    layout_sets = {}
    for name in WEIGHT_ENTRIES:
        if _is_state_dict(obj.get(name)):
            weights[name] = WeightSet.from_tensors(name, obj[name], source)
            check_finite(weights[name], source)
            layout_sets[name] = (type(obj[name]), getattr(obj[name], "_metadata", None))
    if not weights:
        keys = ", ".join(map(str, list(obj)[:10]))
        raise InputError(f"checkpoint {path} has no state dict (top-level entries: {keys})", hint="expected a state dict or a 'state_dict' entry")
    primary = next(n for n in WEIGHT_ENTRIES if n in weights)
    if "ema" in primary:
        raise InputError(f"checkpoint {path} has EMA weights ({primary}) but no 'state_dict'", hint="teleport-cli needs the weights training resumes from")
    ordered = {primary: weights[primary], **{n: w for n, w in weights.items() if n != primary}}
    entries = {k: v for k, v in obj.items() if k not in weights}
    layout = {"bare": False, "type": type(obj), "order": list(obj), "sets": layout_sets}
    meta = _metadata_from(obj, str(path))
    return LoadedCheckpoint(source, Container(KIND, False, layout), meta, sha256_file(path), ordered, entries)


def _rebuild(kind: type, tensors: dict[str, torch.Tensor], dict_metadata):
    out = kind(tensors) if kind in (dict, OrderedDict) else OrderedDict(tensors)
    if dict_metadata is not None:
        out._metadata = dict_metadata
    return out


def build_object(ckpt: LoadedCheckpoint, sets: dict[str, dict[str, torch.Tensor]], entries: dict, metadata: dict[str, str]):
    """The object to ``torch.save``: the input's structure with new weight sets and entries.

    ``metadata`` (provenance) is stored as a ``teleport_metadata`` entry in a training
    checkpoint; a bare state dict has no room for it (an extra key would break
    ``load_state_dict``), so there it is not stored.
    """
    layout = ckpt.container.layout
    if layout["bare"]:
        return _rebuild(layout["type"], sets["state_dict"], layout["dict_metadata"])
    out = {}
    for k in layout["order"]:
        if k in sets:
            kind, dmeta = layout["sets"][k]
            out[k] = _rebuild(kind, sets[k], dmeta)
        elif k in entries:
            out[k] = entries[k]
    for k, v in entries.items():
        if k not in out and k != METADATA_ENTRY:
            out[k] = v
    out[METADATA_ENTRY] = dict(metadata)
    return layout["type"](out) if layout["type"] in (dict, OrderedDict) else out


def save_pickle(obj, path: Path) -> None:
    """``torch.save`` to ``path``.

    Raises:
        OSError: the write failed (torch's ``RuntimeError`` from its zip writer turned into
            ``ENOSPC`` on a full disk, else ``EIO``: :func:`.atomic.as_write_error`).
    """
    try:
        torch.save(obj, str(path))
    except RuntimeError as e:
        raise as_write_error(e, path) from None


def write(ckpt: LoadedCheckpoint, out: Path, sets: dict[str, dict[str, torch.Tensor]], entries: dict, metadata: dict[str, str], *, force: bool = False) -> None:
    """``torch.save`` the same structure atomically (over an existing file only with ``force``)."""
    obj = build_object(ckpt, sets, entries, metadata)
    write_file_atomic(out, lambda tmp: save_pickle(obj, tmp), force=force)
