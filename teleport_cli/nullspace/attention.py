"""``nn.MultiheadAttention``: its projections as teleportable weights, and how to capture them.

``nn.MultiheadAttention`` computes ``q = W_q x_q + b_q``, ``k = W_k x_k + b_k``,
``v = W_v x_v + b_v`` (one fused ``3E x E`` ``in_proj_weight`` when the dimensions agree, else
three bare ``*_proj_weight`` parameters), attention ``c = softmax(q k^T / sqrt(d)) v`` per head,
and ``out = W_o c + b_o`` with ``W_o = out_proj.weight``. ``out_proj`` is never called as a
module (``F.multi_head_attention_forward`` reads its weight), so a forward hook on it never
fires. Everything is therefore captured by one forward hook on the attention module itself:

* the q, k and v blocks of ``in_proj_weight`` each get the Gram of their own input
  (query, key, value). In self-attention the three inputs are the same tensor and the three
  Grams are equal; in cross-attention they differ, and each block moves only inside the null
  space of its own input. If q, k and v are unchanged on the calibration set, so is ``c``
  (design notes, Sec. 2).
* the input of ``out_proj`` is ``c``: the hook reruns the module with ``W_o = I``, ``b_o = 0``
  (``torch.func.functional_call``, same code path, same masks), which returns exactly ``c``;
  the plain-map check then compares ``F.linear(c, W_o, b_o)`` with the module's real output.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerSpec, token_rows

MHA_ARGS = list(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]  # query, key, value, ...


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def attention_specs(name: str, module: nn.Module) -> list | None:
    """The teleportable weights of an ``nn.MultiheadAttention`` (None for any other module).

    Returns:
        ``[(LayerSpec, problem)]``: ``problem`` is None, or why the weight must stay (a subclass
        that overrides ``forward`` cannot be checked and is never moved).
    """
    if not isinstance(module, nn.MultiheadAttention):
        return None
    e = module.embed_dim
    specs = []
    if module._qkv_same_embed_dim:
        specs.append(LayerSpec(_join(name, "in_proj"), "mha_in_proj", 3, e, e, name, "in_proj_weight"))
    else:
        for part, d_in in (("q", e), ("k", module.kdim), ("v", module.vdim)):
            specs.append(LayerSpec(_join(name, f"{part}_proj"), f"mha_{part}_proj", 1, d_in, e, name, f"{part}_proj_weight"))
    specs.append(LayerSpec(_join(name, "out_proj"), "mha_out_proj", 1, e, e, name, "out_proj.weight"))
    problem = None
    if type(module).forward is not nn.MultiheadAttention.forward:
        problem = f"{type(module).__name__} overrides MultiheadAttention.forward: its projections cannot be checked"
    return [(s, problem) for s in specs]


def _qkv(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bound = dict(zip(MHA_ARGS, args))
    bound.update(kwargs)
    return bound["query"], bound["key"], bound["value"]


def attention_context(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """The input of ``out_proj`` for this call: the module rerun with ``W_o = I`` and ``b_o = 0``."""
    w = module.out_proj.weight
    swap = {"out_proj.weight": torch.eye(w.shape[0], dtype=w.dtype, device=w.device)}
    if module.out_proj.bias is not None:
        swap["out_proj.bias"] = torch.zeros_like(module.out_proj.bias)
    out = torch.func.functional_call(module, swap, args, kwargs)
    return out[0] if isinstance(out, tuple) else out


def make_attention_hook(accs: dict, check_plain: Callable[[torch.Tensor, torch.Tensor], float]) -> Callable:
    """A ``register_forward_hook(..., with_kwargs=True)`` hook that feeds ``accs`` (kind -> accumulator).

    ``check_plain(reference, output)`` returns the relative difference used for ``out_proj``.
    The rerun for ``out_proj`` calls the module again; a guard keeps the hook from recursing.
    """
    busy = [False]

    def add(acc, blocks: list[torch.Tensor]) -> None:
        rows = 0
        for i, x in enumerate(blocks):
            x = token_rows(x.detach()).to(acc.product_dtype)
            if acc.gram is None:
                acc.gram = torch.zeros(acc.spec.groups, acc.spec.d_in, acc.spec.d_in, dtype=torch.float64, device=x.device)
            acc.gram[i] += (x.T @ x).to(torch.float64)
            rows = max(rows, x.shape[0])
        acc.rows += rows
        acc.calls += 1

    def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output) -> None:
        if busy[0]:
            return
        q, k, v = _qkv(args, kwargs)
        for kind, acc in accs.items():
            if kind == "mha_in_proj":
                add(acc, [q, k, v])
            elif kind in ("mha_q_proj", "mha_k_proj", "mha_v_proj"):
                add(acc, [{"q": q, "k": k, "v": v}[kind[4]]])
            if acc.plain is None and kind != "mha_out_proj":
                acc.plain, acc.plain_error = True, 0.0  # the known type: exactly F.linear of each input
        acc = accs.get("mha_out_proj")
        if acc is None:
            return
        busy[0] = True
        try:
            ctx = attention_context(module, args, kwargs).detach()
        finally:
            busy[0] = False
        if acc.plain is None:
            y = output[0] if isinstance(output, tuple) else output
            ref = F.linear(token_rows(ctx), module.out_proj.weight, module.out_proj.bias)
            acc.plain_error = check_plain(ref, token_rows(y.detach()))
            acc.plain = acc.plain_error <= acc.tolerance
        add(acc, [ctx])

    return hook
