"""Calibration data for transformers folders: token files, text through the folder's own
tokenizer, and images through its ``preprocessor_config.json``.

The model (:mod:`teleport_cli.models.transformers_adapter`) takes ``(N, T)`` int64 ids with
``-1`` at padded positions. Language-model targets that do not count are ``-100`` (padding and
``-100`` labels alike): the loss of a set is the sum of the counted targets' cross-entropies
divided by their count over the whole set (:func:`teleport_cli.nullspace.losses.loss_for`), so
a set given as one batch has exactly ``model(input_ids, attention_mask=..., labels=...).loss``,
and a set of several batches their token-weighted mean.

Token files (``.safetensors``):

* ``tokens`` ``(N, T + 1)``: next-token pairs as for the built-in language models;
* ``input_ids`` ``(N, T)`` with optional ``attention_mask`` ``(N, T)`` (1 real, 0 padding) and
  optional ``labels``. Causal LM: ``labels`` ``(N, T)`` (default ``input_ids``; ``-100`` not
  counted) are shifted as transformers shifts them (position t predicts ``labels[t + 1]``), so the
  mean over the counted targets equals ``model(input_ids, attention_mask=..., labels=...).loss``
  over the whole set. Masked LM: ``labels`` ``(N, T)`` unshifted. Classifiers: ``labels`` ``(N,)``.
  Padded positions never count as targets, and a causal LM's padded position predicts nothing
  (with left padding, label the first real token -100 to match transformers' loss, which counts
  that prediction from a padded position).

Text (``.txt``, causal LMs): encoded with ``AutoTokenizer.from_pretrained(folder,
local_files_only=True)`` and cut into non-overlapping windows of ``T + 1`` tokens (T the
model's ``hf_context``); a remainder shorter than a window is dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from .images import scan_image_folder
from .tensors import TensorData
from .tokens import tokens_to_data

IGNORE = -100  # an uncounted target, as transformers and teleport_cli.nullspace.losses mark it


def _ints(t: torch.Tensor, name: str, source: str) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        raise InputError(f"{source}: {name!r} must hold integers, not {t.dtype}")
    return t.long()


def hf_token_data(tensors: dict[str, torch.Tensor], task: str, source: str, vocab_size: int | None = None) -> TensorData:
    """The data set of a token file for a transformers model of ``task`` (see the module notes).

    Raises:
        InputError: neither ``tokens`` nor ``input_ids``, shapes that do not agree, missing
            labels for a classifier or masked LM, ids outside the vocabulary.
    """
    if "input_ids" not in tensors:
        if "tokens" in tensors and task == "causal_lm":
            return tokens_to_data(tensors["tokens"], source, vocab_size)
        raise InputError(f"{source} has no 'input_ids' (found: {', '.join(sorted(tensors)) or 'none'})",
                         hint="store input_ids (N, T), optionally attention_mask and labels, as tokenizers return them")
    ids = _ints(tensors["input_ids"], "input_ids", source)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise InputError(f"{source}: 'input_ids' has shape {tuple(ids.shape)}; it needs (N, T) with N >= 1 and T >= 2")
    mask = _ints(tensors.get("attention_mask", torch.ones_like(ids)), "attention_mask", source).bool()
    if mask.shape != ids.shape:
        raise InputError(f"{source}: 'attention_mask' {tuple(mask.shape)} does not match 'input_ids' {tuple(ids.shape)}")
    real = ids[mask]
    if real.numel() and (int(real.min()) < 0 or (vocab_size is not None and int(real.max()) >= vocab_size)):
        raise InputError(f"{source}: token ids range over [{int(real.min())}, {int(real.max())}], outside the vocabulary [0, {vocab_size})")
    inputs = torch.where(mask, ids.clamp(min=0), torch.full_like(ids, -1))
    labels = tensors.get("labels")
    if task in ("sequence_classification",):
        if labels is None or labels.ndim != 1 or labels.shape[0] != ids.shape[0]:
            raise InputError(f"{source}: a sequence classifier needs 'labels' (N,) beside 'input_ids'")
        return TensorData(inputs, _ints(labels, "labels", source), source)
    if labels is None:
        if task != "causal_lm":
            raise InputError(f"{source}: a masked language model needs 'labels' (N, T) (-100 where not masked)")
        labels = ids
    labels = _ints(labels, "labels", source)
    if labels.shape != ids.shape:
        raise InputError(f"{source}: 'labels' {tuple(labels.shape)} does not match 'input_ids' {tuple(ids.shape)}")
    labels = torch.where(mask, labels, torch.full_like(labels, IGNORE))
    bad = (labels != IGNORE) & ((labels < 0) | (labels >= vocab_size if vocab_size is not None else False))
    if bool(bad.any()):
        raise InputError(f"{source}: 'labels' hold {int(labels[bad][0])}, neither -100 nor a token id in [0, {vocab_size})")
    targets = labels
    if task == "causal_lm":  # position t predicts labels[t + 1]: the last position predicts nothing
        inputs, targets = inputs[:, :-1].contiguous(), labels[:, 1:].contiguous()
        # a padded position predicts nothing either (its rows are kept out of the Grams)
        targets = torch.where(inputs >= 0, targets, torch.full_like(targets, IGNORE))
    if not bool((targets != IGNORE).any()):
        raise InputError(f"{source} has no counted target (every label is -100 or padding)")
    return TensorData(inputs, targets, source)


def hf_text_data(path: str | Path, model: nn.Module, *, what: str = "data") -> TensorData:
    """Tokenise a UTF-8 text file with the folder's own tokenizer into windows of ``T + 1`` ids.

    Raises:
        InputError: not a causal LM, no tokenizer in the folder, unreadable text, fewer tokens
            than one window.
    """
    if model.hf_task != "causal_lm":
        raise InputError(f"{what} file {path} is text, which is read for causal language models only", hint="pass a token file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{what} file {path} cannot be read as UTF-8 text ({e})") from None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model.hf_folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{what} file {path} is text, but {model.hf_folder} has no usable tokenizer ({first})",
                         hint="save the tokenizer with save_pretrained, or pass a token file") from None
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    t = model.hf_context
    n = len(ids) // (t + 1)
    if n == 0:
        raise InputError(f"{what} file {path} has {len(ids)} tokens, fewer than one window of {t + 1}")
    return tokens_to_data(ids[: n * (t + 1)].view(n, t + 1), str(path), getattr(model.config, "vocab_size", None))


def hf_image_data(root: str | Path, model: nn.Module, *, what: str = "data") -> tuple[TensorData, dict]:
    """A class-subfolder image tree through the folder's ``preprocessor_config.json``
    (``AutoImageProcessor``, local files only); class order from the config's ``id2label``.

    Raises:
        InputError: no preprocessor config, a subfolder that is not a class, unreadable images.
    """
    from PIL import Image, UnidentifiedImageError
    from transformers import AutoImageProcessor

    folder = Path(model.hf_folder)
    if not (folder / "preprocessor_config.json").is_file():
        raise InputError(f"{what} folder {root}: {folder} has no preprocessor_config.json", hint="pass a tensor file of pixel_values")
    proc = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    id2label = getattr(model.config, "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)] if id2label else None
    samples, _ = scan_image_folder(root, names)
    xs = []
    for path, _ in samples:
        try:
            with Image.open(path) as img:
                xs.append(proc(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0])
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"{what} image {path} cannot be read ({e})", hint="remove or replace the file") from None
    targets = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return TensorData(torch.stack(xs).float(), targets, str(root)), {"processor": type(proc).__name__}
