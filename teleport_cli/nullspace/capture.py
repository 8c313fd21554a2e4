"""Forward hooks that accumulate one float64 Gram matrix per layer over the calibration set.

For each teleportable layer, ``A = X^T X`` (``d_in x d_in`` per group) is summed over all
calibration batches in float64; activations are never kept (design notes, Sec. 2). Each
batch's product ``X_b^T X_b`` is taken in ``product_dtype``: float64 by default and in the
pipeline (the tau = 1 rank rule needs eigenvalues down to ``d_in * eps_float64 * max``, and
float32 products made the teleported weights depend on the batch size beyond 1e-6, docs/cost.md),
or float32 on request for tau < 1 (capture 0.47 -> 0.26 s on test_resnet; the null spaces pass
the float64 comparison of tests/nullspace/test_precision.py). On the
first batch each layer is also checked to be a plain linear map of its input: its output must
equal ``F.linear``/``F.conv1d/2d/3d`` of the captured input with its stored weight and bias, so
that subclasses that transform the weight or the input inside ``forward`` are never teleported.
``nn.MultiheadAttention`` is captured through one hook on the attention module
(:mod:`teleport_cli.nullspace.attention`). A model with a ``token_mask(x)`` method (the
transformers adapter: ``(N, T)`` bool, False at padded positions) has the rows of padded
tokens left out of every Gram whose input is ``(N, T, d)``: padded positions count neither in
the loss nor in the Grams. Every hook handle is removed when the context exits, also on
error.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..parallel.grams import all_reduce_accumulators
from .attention import make_attention_hook
from .layers import LINEAR_KINDS, LayerSpec, input_rows, reference_output, token_rows

PLAIN_RTOL = 1e-4


@dataclass
class GramAccumulator:
    """Running Gram of one layer: ``gram`` is ``(groups, d_in, d_in)`` float64 on the inputs' device.

    ``gram`` is None until the layer's hook first fires (a dead branch keeps it None); each
    batch's product is taken in ``product_dtype`` and added to it in float64.
    ``rows`` counts the rows of one block (for attention blocks with inputs of different
    lengths, the longest); ``calls`` counts hook calls (0: a dead branch).
    """

    spec: LayerSpec
    gram: torch.Tensor | None = None
    rows: int = 0
    calls: int = 0
    plain: bool | None = None
    plain_error: float = 0.0
    tolerance: float = PLAIN_RTOL
    product_dtype: torch.dtype = torch.float64
    notes: list[str] = field(default_factory=list)


def relative_difference(ref: torch.Tensor, y: torch.Tensor) -> float:
    """``max |ref - y| / max |ref|`` (inf when the shapes differ)."""
    if y.is_nested:
        y = token_rows(y)
    if ref.shape != y.shape:
        return float("inf")
    scale = ref.abs().max().item() + 1e-12
    return (ref - y).abs().max().item() / scale


def _check_plain(spec: LayerSpec, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative max difference between the module's output and its plain functional form."""
    try:
        ref = reference_output(spec, module, x)
    except (RuntimeError, ValueError):
        return float("inf")
    return relative_difference(ref, y)


@contextlib.contextmanager
def gram_hooks(layers: list[tuple[LayerSpec, nn.Module]], token_mask: dict | None = None,
               product_dtype: torch.dtype = torch.float64) -> Iterator[dict[str, GramAccumulator]]:
    """Register Gram-accumulating forward hooks on ``layers``; yields name -> accumulator.

    ``token_mask["mask"]``, when set, is the current batch's ``(N, T)`` bool mask of real tokens.
    ``product_dtype``: the dtype of each batch's ``X_b^T X_b`` (the sum is float64).
    """
    accs: dict[str, GramAccumulator] = {}
    token_mask = token_mask if token_mask is not None else {}
    handles = []

    def make_hook(acc: GramAccumulator) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            if acc.plain is None:
                acc.plain_error = _check_plain(acc.spec, module, x, output.detach())
                acc.plain = acc.plain_error <= PLAIN_RTOL
            if not acc.plain:  # never teleported (its reason says why): no rows, which may not even exist
                acc.calls += 1  # (timm's Conv2dSame pads in forward: its bare input can be smaller than the kernel)
                return
            rows = input_rows(acc.spec, module, x).to(acc.product_dtype)
            mask = token_mask.get("mask")
            if mask is not None and not x.is_nested and acc.spec.kind in LINEAR_KINDS and tuple(x.shape[:-1]) == tuple(mask.shape):
                rows = rows[:, mask.reshape(-1)]
            if acc.gram is None:
                acc.gram = torch.zeros(acc.spec.groups, acc.spec.d_in, acc.spec.d_in, dtype=torch.float64, device=x.device)
            acc.gram += torch.bmm(rows.transpose(1, 2), rows).to(torch.float64)
            acc.rows += rows.shape[1]
            acc.calls += 1

        return hook

    try:
        attention: dict[int, tuple[nn.Module, dict[str, GramAccumulator]]] = {}
        for spec, module in layers:
            acc = GramAccumulator(spec, product_dtype=product_dtype)
            accs[spec.name] = acc
            if spec.kind.startswith("mha_"):
                attention.setdefault(id(module), (module, {}))[1][spec.kind] = acc
            else:
                handles.append(module.register_forward_hook(make_hook(acc)))
        for module, by_kind in attention.values():
            hook = make_attention_hook(by_kind, relative_difference)
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield accs
    finally:
        for h in handles:
            h.remove()


def capture_grams(
    model: nn.Module,
    layers: list[tuple[LayerSpec, nn.Module]],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    on_batch: Callable[[int], None] | None = None,
    product_dtype: torch.dtype = torch.float64,
) -> dict[str, GramAccumulator]:
    """Stream the calibration batches through ``model`` (eval mode, no grad) and return the Grams.

    Args:
        model: the model, already on its device and in eval mode.
        layers: the layers to capture (from :func:`teleport_cli.nullspace.selection.find_layers`).
        batches: re-iterable of ``(inputs, targets)`` on the model's device.
        on_batch: called with the number of samples after each batch (progress).
        product_dtype: dtype of each batch's product (float32 only where tau < 1; see above).

    Returns:
        name -> accumulator with ``gram`` ``(groups, d_in, d_in)`` float64 (on the inputs' device), the number of
        rows, the number of hook calls (0 means a dead branch) and the plain-map check.
    """
    masking = getattr(model, "token_mask", None)
    current: dict = {}
    with torch.no_grad(), gram_hooks(layers, current, product_dtype) as accs:
        for x, _ in batches:
            current["mask"] = masking(x) if callable(masking) else None
            model(x)
            if on_batch is not None:
                on_batch(int(x.shape[0]))
    all_reduce_accumulators(accs)  # data parallel: the Grams of every rank's shard, summed
    return accs
