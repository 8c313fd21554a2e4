"""Model specifications to ``nn.Module``, and strict loading of state dicts.

A checkpoint's metadata names its architecture: ``arch`` (a built-in name such as ``mlp`` or
``char_lm``, or any timm model name) and ``model_kwargs`` (JSON). Metadata may only name
built-in or timm architectures, never import code: a data file must not be able to run code.
A user's own ``nn.Module`` comes from the command line only (``--model package.module:factory``,
see :mod:`teleport_cli.models.factories`).
"""

from __future__ import annotations

import json
from typing import Callable

import torch
from torch import nn

from ..errors import InputError
from .char_lm import CharLM


class MLP(nn.Module):
    """A ReLU multilayer perceptron classifier.

    Args:
        in_features: input dimension (64 for 8x8 digits).
        hidden: widths of the hidden layers.
        num_classes: number of output logits.

    Input ``(N, in_features)`` float32; output ``(N, num_classes)`` logits. Modules are named
    ``hidden.0``, ``hidden.1``, ..., ``head``.
    """

    def __init__(self, in_features: int = 64, hidden: list[int] | tuple[int, ...] = (128, 64), num_classes: int = 10):
        super().__init__()
        widths = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.head(x)


BUILTIN: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "char_lm": CharLM}


def build_model(arch: str, kwargs: dict | None = None) -> nn.Module:
    """Instantiate a built-in architecture or a timm model (random init, no download).

    Raises:
        InputError: unknown architecture or keyword arguments it does not take.
    """
    kwargs = dict(kwargs or {})
    try:
        if arch in BUILTIN:
            return BUILTIN[arch](**kwargs)
        import timm

        if not timm.is_model(arch):
            raise InputError(f"unknown architecture {arch!r}", hint=f"use a built-in ({', '.join(BUILTIN)}) or a timm model name")
        return timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError) as e:
        raise InputError(f"architecture {arch!r} does not accept these model kwargs: {e}", hint="check model_kwargs") from None
    except (RuntimeError, MemoryError) as e:  # negative or absurd widths: torch refuses to allocate
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"architecture {arch!r} cannot be built with model kwargs {json.dumps(kwargs, default=str)}: {first}",
                         hint="check model_kwargs") from None


def model_from_metadata(metadata: dict[str, str], source: str) -> tuple[nn.Module, str, dict]:
    """Build the model that a checkpoint's metadata describes.

    Returns:
        (model, arch, kwargs).

    Raises:
        InputError: no ``arch`` entry, or invalid ``model_kwargs`` JSON.
    """
    arch = metadata.get("arch")
    if not arch:
        raise InputError(
            f"{source} does not name its architecture (no 'arch' in its metadata), so the model cannot be rebuilt",
            hint="pass --model NAME (and --model-kwargs JSON)",
        )
    try:
        kwargs = json.loads(metadata.get("model_kwargs", "{}"))
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: metadata 'model_kwargs' is not valid JSON ({e.msg})") from None
    if not isinstance(kwargs, dict):
        raise InputError(f"{source}: metadata 'model_kwargs' must be a JSON object")
    if ":" in arch or (arch not in BUILTIN and not _is_timm(arch)):
        raise InputError(
            f"{source}: metadata names the architecture {arch!r}, which is neither built-in nor a timm model; "
            "a checkpoint's metadata may not name code to import",
            hint="if you trust that code, pass --model package.module:factory on the command line",
        )
    return build_model(arch, kwargs), arch, kwargs


def _is_timm(arch: str) -> bool:
    import timm

    return bool(timm.is_model(arch))
