"""Hugging Face style folders: ``config.json`` plus ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) and/or ``pytorch_model.bin``, as timm's ``save_for_hf`` and
transformers' ``save_pretrained`` write them.

A transformers ``config.json`` (it has ``model_type``; timm's has ``architecture``) is
recorded in the layout as ``transformers`` (``architecture``, ``model_type``, ``task``) for
:mod:`teleport_cli.models.transformers_adapter` to rebuild; its ``loss`` is ``lm`` for causal
and masked language models, ``ce`` for classifiers. Tied keys the folder leaves out (GPT-2's
``lm_head.weight``) stay out when written back, and the weight files keep the input's header
metadata exactly (``{"format": "pt"}``): the provenance of the teleport goes to
``teleport.json`` beside them, so that transformers reads the folder as its own.

``config.json`` names the architecture (``architecture``), its constructor arguments
(``model_args``, else ``num_classes``) and the preprocessing (``pretrained_cfg``: input size,
mean, std); these become the checkpoint's ``arch``, ``model_kwargs`` and ``data_config``.
When both a safetensors and a pickle weight file are present they must hold the same
tensors; both are written. ``config.json`` and every other file are copied unchanged and the
folder is replaced atomically.
"""

from __future__ import annotations

import json
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
from .sharded import INDEX, copy_others, read_index, write_shards
from .single import read_safetensors, write_safetensors
from .torchfile import _is_state_dict, _rebuild, load_pickle, save_pickle

KIND = "hf"
CONFIG = "config.json"
PROVENANCE = "teleport.json"  # a transformers folder's provenance record (its weight headers stay as read)
SAFE = "model.safetensors"
PICKLE = "pytorch_model.bin"
DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


TASK_SUFFIXES = (
    ("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"), ("ForSequenceClassification", "sequence_classification"),
    ("ForImageClassification", "image_classification"), ("ForMaskedLM", "masked_lm"),
)


def transformers_info(config: dict) -> dict | None:
    """``{"architecture", "model_type", "task"}`` of a transformers ``config.json``, else None.

    ``task`` is None when ``architectures`` names no causal LM, classifier or masked LM.
    """
    if "architecture" in config or not isinstance(config.get("model_type"), str):
        return None
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    task = next((t for suffix, t in TASK_SUFFIXES if arch and arch.endswith(suffix)), None)
    return {"architecture": arch, "model_type": config["model_type"], "task": task}


def metadata_from_config(config: dict) -> dict[str, str]:
    """``arch``, ``model_kwargs`` and ``data_config`` from a timm ``config.json``."""
    meta: dict[str, str] = {}
    if isinstance(config.get("architecture"), str):
        meta["arch"] = config["architecture"]
    kwargs = config.get("model_args")
    if not isinstance(kwargs, dict):
        kwargs = {"num_classes": config["num_classes"]} if "num_classes" in config else {}
    meta["model_kwargs"] = json.dumps(kwargs)
    pcfg = config.get("pretrained_cfg") or {}
    data = {k: pcfg[k] for k in DATA_KEYS if k in pcfg}
    if data:
        meta["data_config"] = json.dumps(data)
    return meta


def read(path: str | Path, *, trust_pickle: bool = False) -> LoadedCheckpoint:
    """Read a Hugging Face style folder.

    Links are checked before anything is read (:func:`.base.folder_files`: a Hugging Face cache
    snapshot, whose files are links into ``../../blobs``, is accepted).

    Raises:
        InputError: a refused link or special file, unreadable ``config.json``, no weight file,
            the safetensors and pickle weight files disagree, NaN or Inf in a tensor.
    """
    folder = Path(path)
    folder_files(folder, str(path))
    try:
        config = json.loads((folder / CONFIG).read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise InputError(f"{folder / CONFIG} is not a readable JSON config: {e}", hint="timm's save_for_hf writes it") from None
    files = {"safe": (folder / SAFE).is_file(), "index": (folder / INDEX).is_file(), "pickle": (folder / PICKLE).is_file()}
    layout: dict = {"files": [k for k, v in files.items() if v]}
    if files["index"]:
        tensors, _, shard_layout = read_index(folder)
        layout["sharded"] = shard_layout
    elif files["safe"]:
        tensors, layout["safe_metadata"] = read_safetensors(folder / SAFE)
    elif files["pickle"]:
        tensors = None
    else:
        raise InputError(f"{folder} has {CONFIG} but no {SAFE}, {INDEX} or {PICKLE}", hint="is the folder complete?")
    if files["pickle"]:
        obj = load_pickle(folder / PICKLE, trust_pickle=trust_pickle)
        if not _is_state_dict(obj):
            raise InputError(f"{folder / PICKLE} is not a state dict", hint="save_for_hf writes model.state_dict()")
        layout["pickle_type"], layout["pickle_metadata"] = type(obj), getattr(obj, "_metadata", None)
        if tensors is not None and (set(obj) != set(tensors) or any(not torch.equal(obj[k], tensors[k]) for k in tensors)):
            raise InputError(f"{folder}: {PICKLE} and the safetensors weights differ", hint="remove the stale one")
        tensors = dict(obj)  # the pickle keeps key order, strides and ties; the values are the same
    ws = WeightSet.from_tensors("state_dict", tensors, str(path))
    check_finite(ws, str(path))
    metadata = metadata_from_config(config)
    info = transformers_info(config)
    if info is not None:
        layout["transformers"] = info
        metadata = {"arch": info["architecture"] or info["model_type"], "model_kwargs": "{}",
                    "loss": "lm" if info["task"] in ("causal_lm", "masked_lm") else "ce"}
    return LoadedCheckpoint(str(path), Container(KIND, True, layout), metadata, sha256_folder(folder), {"state_dict": ws})


def write(ckpt: LoadedCheckpoint, out: Path, sets: dict[str, dict[str, torch.Tensor]], entries: dict, metadata: dict[str, str], *, force: bool = False) -> None:
    """Write the weight files the input had, copy config.json and the rest, publish atomically
    (over an existing folder only with ``force``)."""
    layout = ckpt.container.layout
    tensors = sets["state_dict"]
    written: set[str] = set()
    provenance = None
    if "transformers" in layout:
        provenance, metadata = metadata, {}
    with staged_folder(out, force=force) as tmp:
        if "sharded" in layout:
            write_shards(tmp, layout["sharded"], tensors, metadata)
            written |= {layout["sharded"]["index"], *layout["sharded"]["shards"].values()}
        elif "safe" in layout["files"]:
            write_safetensors(tmp / SAFE, tensors, {**layout.get("safe_metadata", {}), **metadata})
            written.add(SAFE)
        if "pickle" in layout["files"]:
            save_pickle(_rebuild(layout["pickle_type"], tensors, layout["pickle_metadata"]), tmp / PICKLE)
            written.add(PICKLE)
        if provenance is not None:
            (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
            written.add(PROVENANCE)
        copy_others(Path(ckpt.path), tmp, written)
