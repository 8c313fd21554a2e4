"""Which modules are teleportable, how their inputs become rows, and how their weights are viewed.

Pure functions over modules and tensors (no hooks, no state). A layer with weight W
(``d_out x d_in``) computes ``z = W x + b``; the rows of its input matrix X are one per sample
(Linear: one per sample and token) or one per unfolded patch (Conv1d/2d/3d), exactly as the
layer sees them (arXiv:2502.11362, Sec. 3; design notes, Sec. 2). Grouped convs have one block
per group: weight ``(groups, C_out/groups, C_in/groups * prod(kernel))`` and rows
``(groups, N * L, C_in/groups * prod(kernel))``.

Hugging Face's ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``) computes ``y = x W + b``
with W stored ``d_in x d_out`` (the transpose of ``nn.Linear``'s): it is kind ``hf_conv1d``, a
linear layer whose ``d_out x d_in`` weight is ``W^T``; :func:`weight_blocks` and
:func:`from_blocks` move between the stored tensor and that view, so the null-space move of
``W^T`` is written back as the move of W. It is recognised by its class name and attributes
(``nf``, a 2-D ``weight``), without importing transformers, and checked at capture time.

``nn.MultiheadAttention`` keeps its q/k/v projection as a bare parameter and never calls its
``out_proj`` as a module; :mod:`teleport_cli.nullspace.attention` describes and captures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}
LINEAR_KINDS = ("linear", "hf_conv1d")  # a linear map of each token's features
CONV_FUNCTIONS = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


@dataclass(frozen=True)
class LayerSpec:
    """Static description of one teleportable weight.

    Attributes:
        name: display name: the qualified module name (``blocks.0.mlp.fc1``), or for the
            attention projections of an ``nn.MultiheadAttention`` ``attn.in_proj`` /
            ``attn.out_proj`` / ``attn.q_proj`` ...
        kind: ``linear``, ``conv1d``, ``conv2d``, ``conv3d``, ``mha_in_proj`` (the fused
            ``3E x E`` q/k/v weight as three blocks), ``mha_q_proj``/``mha_k_proj``/
            ``mha_v_proj`` (separate weights when kdim/vdim differ) or ``mha_out_proj``.
        groups: number of weight blocks with their own Gram (conv groups; 3 for ``mha_in_proj``;
            else 1).
        d_in: columns of one block (``in_features``, or ``C_in/groups * prod(kernel)``).
        d_out: rows of one block (``out_features``, or ``C_out/groups``).
        module_name: qualified name of the module the weight is reached from (and hooked on);
            ``None`` means ``name``.
        param: the weight's attribute path below that module (``weight``, ``in_proj_weight``,
            ``out_proj.weight``).
    """

    name: str
    kind: str
    groups: int
    d_in: int
    d_out: int
    module_name: str | None = None
    param: str = "weight"

    @property
    def weight_key(self) -> str:
        """The weight's key in the model's state dict."""
        owner = self.name if self.module_name is None else self.module_name
        return f"{owner}.{self.param}" if owner else self.param


@dataclass(frozen=True)
class Excluded:
    """A module with parameters that is left alone, and why."""

    name: str
    kind: str
    reason: str


def layer_weight(spec: LayerSpec, module: nn.Module) -> torch.Tensor:
    """The weight parameter a spec moves, reached from its (hooked) module."""
    return module.get_parameter(spec.param)


def is_hf_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D``: ``y = x W + b`` with a 2-D weight ``d_in x nf``."""
    w = module._parameters.get("weight")
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int) and w is not None and w.ndim == 2


def _kind_of(module: nn.Module) -> str | None:
    for cls, kind in KINDS.items():
        if isinstance(module, cls):
            return kind
    if is_hf_conv1d(module):
        return "hf_conv1d"
    return None


def spec_of(name: str, module: nn.Module) -> LayerSpec:
    """The LayerSpec of a Linear or Conv1d/2d/3d module."""
    kind = _kind_of(module)
    if kind == "linear":
        return LayerSpec(name, kind, 1, module.in_features, module.out_features)
    if kind == "hf_conv1d":
        return LayerSpec(name, kind, 1, int(module.weight.shape[0]), int(module.weight.shape[1]))
    if kind is not None:
        g = module.groups
        k = int(torch.tensor(module.kernel_size).prod())
        return LayerSpec(name, kind, g, module.in_channels // g * k, module.out_channels // g)
    raise TypeError(f"{name}: {type(module).__name__} is not a teleportable layer type")


def _conv_padded_input(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input padded as the conv pads it, and the zero padding still to apply per dim."""
    nd = len(module.kernel_size)
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * nd
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return x, (0,) * nd
        pads = []  # 'same': torch pads total = d * (k - 1), the left half rounded down
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0,) * nd
    return x, tuple(module.padding)


def conv_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unfold an ``(N, C, *spatial)`` input into the patches a Conv1d/2d/3d multiplies.

    Explicit unfolding with ``Tensor.unfold`` per spatial dim (window ``d*(k-1)+1`` at the
    conv's stride, then every ``d``-th element for the dilation), after the conv's own padding.

    Returns:
        ``(N * L, C * prod(kernel))`` with columns channel-major, as in ``weight.view(C_out, -1)``.
    """
    xp, padding = _conv_padded_input(module, x)
    nd = len(module.kernel_size)
    if any(padding):
        xp = F.pad(xp, [p for p in reversed(padding) for _ in range(2)])
    for i, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        xp = xp.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    # (N, C, L_1..L_nd, k_1..k_nd) -> (N, L_1..L_nd, C, k_1..k_nd)
    order = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    n, c = xp.shape[:2]
    return xp.permute(order).reshape(-1, c * int(torch.tensor(module.kernel_size).prod()))


def token_rows(t: torch.Tensor) -> torch.Tensor:
    """``(..., d)`` -> ``(rows, d)``; a nested tensor (``nn.TransformerEncoder`` with a padding
    mask in eval mode) gives the rows of its components, without the padding."""
    if t.is_nested:
        return torch.cat([c.reshape(-1, c.shape[-1]) for c in t.unbind()])
    return t.reshape(-1, t.shape[-1])


def input_rows(spec: LayerSpec, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows of X for one batch of a Linear or Conv layer's input.

    Args:
        x: the layer's input; ``(..., d_in)`` for Linear, ``(N, C_in, *spatial)`` for ConvNd.

    Returns:
        ``(groups, rows, d_in)`` in x's dtype.
    """
    if spec.kind in LINEAR_KINDS:
        return token_rows(x).unsqueeze(0)
    if x.dim() == len(module.kernel_size) + 1:  # unbatched input
        x = x.unsqueeze(0)
    rows = conv_patches(module, x).reshape(-1, spec.groups, spec.d_in)
    return rows.transpose(0, 1)


def weight_blocks(spec: LayerSpec, weight: torch.Tensor) -> torch.Tensor:
    """The weight as ``(groups, d_out, d_in)`` blocks (a view when the weight is contiguous;
    for ``hf_conv1d`` the transpose of the stored ``d_in x d_out`` tensor, also a view)."""
    if spec.kind == "hf_conv1d":
        return weight.t().unsqueeze(0)
    return weight.reshape(spec.groups, spec.d_out, spec.d_in)


def from_blocks(spec: LayerSpec, blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`weight_blocks`: ``(groups, d_out, d_in)`` blocks as a tensor of the
    stored weight's ``shape``."""
    if spec.kind == "hf_conv1d":
        return blocks[0].t()
    return blocks.reshape(shape)


def reference_output(spec: LayerSpec, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the layer computes if it is a plain linear map of x with its stored weight and bias."""
    if spec.kind == "linear":
        return F.linear(token_rows(x) if x.is_nested else x, module.weight, module.bias)
    if spec.kind == "hf_conv1d":
        return F.linear(x, module.weight.t(), module.bias)
    xp, padding = _conv_padded_input(module, x)
    conv = CONV_FUNCTIONS[spec.kind]
    return conv(xp, module.weight, module.bias, module.stride, padding, module.dilation, module.groups)
