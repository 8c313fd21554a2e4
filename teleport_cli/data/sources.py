"""Which kind of data a path holds, loading it, and the seeded choice of ``--samples``.

==========================================  ================================================
path                                        read as
==========================================  ================================================
a folder                                    image folder (:mod:`teleport_cli.data.images`)
``.safetensors`` with ``tokens``            token file (:mod:`teleport_cli.data.tokens`)
``.safetensors`` with ``inputs``/``targets``  tensor file (:mod:`teleport_cli.data.tensors`)
``.txt``                                    text with the checkpoint's vocabulary
==========================================  ================================================

For a transformers model (one with ``hf_task``), token files, text and image folders are read
by :mod:`teleport_cli.data.transformers_data` (its tokenizer, its preprocessor, HF labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.tensor_files import read_tensor_file
from ..errors import InputError
from .images import load_image_folder
from .tensors import TensorData, tensor_data_from
from .tokens import load_text_file, tokens_to_data


@dataclass
class LoadedData:
    """A data set and how it was read.

    Attributes:
        data: the samples.
        kind: ``tensors``, ``tokens``, ``text`` or ``image_folder``.
        preprocessing: the resolved timm data config for image folders (else empty).
        selection: ``--samples`` record: ``{"samples", "available", "seed", "indices"}``
            (``indices`` into the file's samples, sorted; None when all were used).
    """

    data: TensorData
    kind: str
    preprocessing: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"kind": self.kind, "preprocessing": self.preprocessing, "selection": self.selection}


def load_data(path: str | Path, data_config: dict | None = None, model: nn.Module | None = None, *, what: str = "data") -> LoadedData:
    """Read a calibration or held-out set of any supported kind (see the module table).

    Args:
        data_config: the checkpoint's ``data_config`` metadata (image preprocessing, text vocabulary).
        model: the model (for timm defaults and the channel check of image folders).

    Raises:
        InputError: a missing path, an unknown kind, or a malformed file.
    """
    p = Path(path)
    if getattr(model, "hf_task", None) is not None:
        return _load_transformers(p, model, what)
    if p.is_dir():
        data, cfg = load_image_folder(p, data_config, model, what=what)
        return LoadedData(data, "image_folder", cfg)
    if p.suffix == ".txt":
        if not p.exists():
            raise InputError(f"{what} file {path} does not exist", hint="check the path")
        return LoadedData(load_text_file(p, data_config, what=what), "text")
    tensors, _ = read_tensor_file(p, what=what)
    if "tokens" in tensors:
        vocab = (data_config or {}).get("vocab")
        return LoadedData(tokens_to_data(tensors["tokens"], f"{what} file {path}", len(vocab) if isinstance(vocab, str) else None), "tokens")
    return LoadedData(tensor_data_from(tensors, p, what=what), "tensors")


def _load_transformers(p: Path, model: nn.Module, what: str) -> LoadedData:
    from . import transformers_data as td

    if p.is_dir() and (Path(model.hf_folder) / "preprocessor_config.json").is_file():
        data, cfg = td.hf_image_data(p, model, what=what)
        return LoadedData(data, "image_folder", cfg)
    if p.suffix == ".txt":
        if not p.exists():
            raise InputError(f"{what} file {p} does not exist", hint="check the path")
        return LoadedData(td.hf_text_data(p, model, what=what), "text")
    if p.is_dir():
        raise InputError(f"{what} folder {p}: {model.hf_folder} has no preprocessor_config.json to read images with")
    tensors, _ = read_tensor_file(p, what=what)
    if "input_ids" in tensors or "tokens" in tensors:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        return LoadedData(td.hf_token_data(tensors, model.hf_task, f"{what} file {p}", vocab), "tokens")
    return LoadedData(tensor_data_from(tensors, p, what=what), "tensors")


def choose_samples(loaded: LoadedData, samples: int | None, seed: int) -> LoadedData:
    """Keep a seeded random choice of ``samples`` samples (all when None); record which.

    The indices are ``torch.randperm(N, generator=manual_seed(seed))[:samples]``, sorted.

    Raises:
        InputError: ``samples`` < 1 or more than the data hold.
    """
    n = len(loaded.data)
    if samples is None:
        loaded.selection = {"samples": n, "available": n, "seed": None, "indices": None}
        return loaded
    if samples < 1 or samples > n:
        raise InputError(f"--samples {samples}: {loaded.data.source} holds {n} samples", hint=f"choose 1 to {n}")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples].sort().values
    chosen = loaded.data.subset(idx)
    return LoadedData(chosen, loaded.kind, loaded.preprocessing, {"samples": samples, "available": n, "seed": seed, "indices": idx.tolist()})
