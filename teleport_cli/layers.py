"""Which modules are teleportable, how their inputs become rows, and how their weights are viewed.

Pure functions over modules and tensors (no hooks, no state). A layer with weight W
(``d_out x d_in``) computes ``z = W x + b``; the rows of its input matrix X are one per sample
(Linear: one per sample and token) or one per unfolded patch (Conv2d), exactly as the layer sees
them (arXiv:2502.11362, Sec. 3; design notes, Sec. 2). Grouped convs have one block per group:
weight ``(groups, C_out/groups, C_in/groups * kh * kw)`` and rows
``(groups, N * L, C_in/groups * kh * kw)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = {nn.Linear: "linear", nn.Conv2d: "conv2d"}


@dataclass(frozen=True)
class LayerSpec:
    """Static description of one teleportable layer.

    Attributes:
        name: qualified module name.
        kind: ``linear`` or ``conv2d``.
        groups: number of weight blocks (conv groups; 1 for Linear).
        d_in: columns of one block (``in_features``, or ``C_in/groups * kh * kw``).
        d_out: rows of one block (``out_features``, or ``C_out/groups``).
    """

    name: str
    kind: str
    groups: int
    d_in: int
    d_out: int


@dataclass(frozen=True)
class Excluded:
    """A weight-bearing module that is left alone, and why."""

    name: str
    kind: str
    reason: str


def _kind_of(module: nn.Module) -> str | None:
    for cls, kind in KINDS.items():
        if isinstance(module, cls):
            return kind
    return None


def spec_of(name: str, module: nn.Module) -> LayerSpec:
    """The LayerSpec of a Linear or Conv2d module."""
    kind = _kind_of(module)
    if kind == "linear":
        return LayerSpec(name, kind, 1, module.in_features, module.out_features)
    if kind == "conv2d":
        g = module.groups
        kh, kw = module.kernel_size
        return LayerSpec(name, kind, g, module.in_channels // g * kh * kw, module.out_channels // g)
    raise TypeError(f"{name}: {type(module).__name__} is not a teleportable layer type")


def find_layers(model: nn.Module) -> tuple[list[tuple[LayerSpec, nn.Module]], list[Excluded]]:
    """Discover teleportable layers from the module tree.

    A Linear or Conv2d (or a subclass; subclasses are checked against the plain functional
    form at capture time) is teleportable when its weight is trainable and not shared with
    another module. Normalisation layers, embeddings and everything else are not weight
    matrices of a linear map of their input and are never touched.

    Returns:
        (layers, excluded): the teleportable layers in module order, and the excluded
        Linear/Conv2d modules with their reason.
    """
    holders: dict[int, dict[int, str]] = {}  # parameter id -> {module id: module name}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), {}).setdefault(id(module), name)

    layers: list[tuple[LayerSpec, nn.Module]] = []
    excluded: list[Excluded] = []
    for name, module in model.named_modules():
        kind = _kind_of(module)
        if kind is None:
            continue
        w = module.weight
        others = [n for m, n in holders.get(id(w), {}).items() if m != id(module)]
        if others:
            excluded.append(Excluded(name, kind, "weight is tied to " + ", ".join(others)))
        elif not w.requires_grad:
            excluded.append(Excluded(name, kind, "weight is frozen (requires_grad=False)"))
        else:
            layers.append((spec_of(name, module), module))
    return layers, excluded


def _conv_padded_input(module: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The input padded as the conv pads it, and the padding still to apply (for unfold)."""
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0, 0)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return x, (0, 0)
        pads = []  # 'same': torch pads total = d * (k - 1), the left half rounded down
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0, 0)
    return x, tuple(module.padding)


def input_rows(spec: LayerSpec, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows of X for one batch of the layer's input.

    Args:
        x: the layer's input; ``(..., d_in)`` for Linear, ``(N, C_in, H, W)`` for Conv2d.

    Returns:
        ``(groups, rows, d_in)`` in x's dtype.
    """
    if spec.kind == "linear":
        return x.reshape(1, -1, spec.d_in)
    xp, padding = _conv_padded_input(module, x)
    cols = F.unfold(xp, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    n, d, length = cols.shape  # d = C_in * kh * kw, channel-major as in weight.view(C_out, -1)
    rows = cols.transpose(1, 2).reshape(n * length, spec.groups, spec.d_in)
    return rows.transpose(0, 1)


def weight_blocks(spec: LayerSpec, weight: torch.Tensor) -> torch.Tensor:
    """The weight as ``(groups, d_out, d_in)`` blocks (a view when the weight is contiguous)."""
    return weight.reshape(spec.groups, spec.d_out, spec.d_in)


def reference_output(spec: LayerSpec, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the layer computes if it is a plain linear map of x with its stored weight and bias."""
    if spec.kind == "linear":
        return F.linear(x, module.weight, module.bias)
    xp, padding = _conv_padded_input(module, x)
    return F.conv2d(xp, module.weight, module.bias, module.stride, padding, module.dilation, module.groups)
