"""Token data for language models: token files and plain text with the checkpoint's vocabulary.

Two formats, both giving next-token pairs ``inputs = tokens[:, :-1]``,
``targets = tokens[:, 1:]`` (``(N, T)`` int64 each) for ``--loss lm``:

* a token file: a ``.safetensors`` file with one integer tensor ``tokens`` of shape
  ``(N, T + 1)`` (token ids, one sequence per row);
* a text file (``.txt``, UTF-8) tokenised with the character vocabulary stored in the
  checkpoint's ``data_config`` (``"vocab"``: a string whose i-th character is token i;
  ``"context"``: T) and cut into ``len(text) // (T + 1)`` consecutive, non-overlapping windows
  of ``T + 1`` characters (a remainder shorter than a window is dropped).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from .tensors import TensorData


def tokens_to_data(tokens: torch.Tensor, source: str, vocab_size: int | None = None) -> TensorData:
    """Next-token pairs from ``(N, T + 1)`` integer token ids.

    Raises:
        InputError: not 2-D, fewer than 2 tokens per row, not integers, ids out of range.
    """
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise InputError(f"{source}: 'tokens' must hold integer token ids, not {tokens.dtype}")
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise InputError(
            f"{source}: 'tokens' has shape {tuple(tokens.shape)}; it needs (N, T + 1) with N >= 1 and T >= 1",
            hint="one sequence per row; the last column is only a target",
        )
    tokens = tokens.long()
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise InputError(f"{source}: token ids range over [{low}, {high}], outside the vocabulary [0, {vocab_size})")
    return TensorData(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), source)


def encode_text(text: str, vocab: str, source: str = "text") -> torch.Tensor:
    """Character ids of ``text`` under ``vocab`` (``vocab[i]`` is token i), ``(len(text),)`` int64.

    Raises:
        InputError: the text holds characters the vocabulary lacks.
    """
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted({c for c in text if c not in index})
    if unknown:
        raise InputError(
            f"{source} holds {len(unknown)} characters outside the checkpoint's vocabulary: {''.join(unknown[:20])!r}",
            hint="remove them, or use the text the model was trained on",
        )
    return torch.tensor([index[c] for c in text], dtype=torch.int64)


def load_text_file(path: str | Path, data_config: dict | None, *, what: str = "data") -> TensorData:
    """Tokenise a UTF-8 text file with the checkpoint's character vocabulary into windows.

    Raises:
        InputError: no ``vocab``/``context`` in the data config, unreadable file, unknown
            characters, text shorter than one window.
    """
    cfg = data_config or {}
    vocab, context = cfg.get("vocab"), cfg.get("context")
    if not isinstance(vocab, str) or not isinstance(context, int) or context < 1:
        raise InputError(
            f"{what} file {path} is text, but the checkpoint's data_config has no character 'vocab' and 'context'",
            hint="pass a token file (.safetensors with 'tokens' N x (T+1)) instead",
        )
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{what} file {path} cannot be read as UTF-8 text ({e})") from None
    ids = encode_text(text, vocab, f"{what} file {path}")
    n = len(ids) // (context + 1)
    if n == 0:
        raise InputError(f"{what} file {path} has {len(ids)} characters, fewer than one window of {context + 1}")
    return tokens_to_data(ids[: n * (context + 1)].view(n, context + 1), str(path), len(vocab))
