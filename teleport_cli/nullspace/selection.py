"""Which modules of a model are teleportable, and why every other module with parameters is not.

A Linear or Conv1d/2d/3d weight, or a projection of ``nn.MultiheadAttention``
(:mod:`teleport_cli.nullspace.attention`), moves when it is a trainable parameter of its own;
everything else that holds parameters is listed with its reason (design notes, Sec. 2).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from .attention import attention_specs
from .layers import Excluded, LayerSpec, _kind_of, spec_of

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


def _other_reason(module: nn.Module) -> tuple[str, str]:
    """Kind and reason for a module with parameters that is not a teleportable layer."""
    cls = type(module).__name__
    if isinstance(module, NORM_TYPES) or "norm" in cls.lower():
        return "norm", f"normalisation layer ({cls}): a per-channel scale and shift, not a linear map of its input"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding", f"embedding ({cls}): a lookup table, its rows are not weights of a linear map"
    names = ", ".join(n for n, p in module._parameters.items() if p is not None)
    return cls.lower(), f"parameters {names} of {cls} are not the weight of a Linear/Conv layer"


def _exclusion(module: nn.Module, weight: torch.Tensor | None, others: list[str]) -> str | None:
    """Why a Linear/Conv/attention weight must not move, or None."""
    if weight is None:
        return "has no weight parameter (computed in forward, e.g. old-style weight_norm)"
    if others:
        return "weight is tied to " + ", ".join(others)
    if not weight.requires_grad:
        return "weight is frozen (requires_grad=False)"
    return None


def select_layers(
    layers: list[tuple[LayerSpec, nn.Module]], excluded: list[Excluded], include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
) -> tuple[list[tuple[LayerSpec, nn.Module]], list[Excluded]]:
    """Keep the teleportable layers whose name matches a glob of ``include`` (all when empty) and
    none of ``exclude`` (exclude wins); the others join ``excluded`` with their reason.

    Globs are :func:`fnmatch.fnmatchcase` patterns over the layer names ``teleport inspect``
    lists (``layer4.*``, ``fc``, ``blocks.*.attn.in_proj``).

    Raises:
        ConfigError (exit 2): a glob that matches no teleportable layer.
    """
    names = [spec.name for spec, _ in layers]
    for flag, globs in (("--layers", include), ("--exclude", exclude)):
        for glob in globs:
            if not any(fnmatchcase(n, glob) for n in names):
                raise ConfigError(f"{flag} {glob!r} matches no teleportable layer", hint="`teleport inspect` lists the layer names")
    kept, dropped = [], []
    for spec, module in layers:
        if any(fnmatchcase(spec.name, g) for g in exclude):
            dropped.append(Excluded(spec.name, spec.kind, "excluded by --exclude"))
        elif include and not any(fnmatchcase(spec.name, g) for g in include):
            dropped.append(Excluded(spec.name, spec.kind, "not matched by --layers"))
        else:
            kept.append((spec, module))
    return kept, dropped + list(excluded)


def find_layers(model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> tuple[list[tuple[LayerSpec, nn.Module]], list[Excluded]]:
    """Discover teleportable layers from the module tree.

    A Linear or Conv1d/2d/3d (or a subclass; subclasses are checked against the plain
    functional form at capture time) is teleportable when its weight is a trainable parameter
    of its own, not shared with another module and not parametrized (``weight_norm``,
    ``torch.nn.utils.parametrize``: the stored tensors are not the weight). The projections of
    ``nn.MultiheadAttention`` come from :func:`teleport_cli.nullspace.attention.attention_specs`.
    Every other module that holds parameters (normalisation layers, embeddings, position
    embeddings, layer scales, ...) is reported as excluded with the reason. ``include`` and
    ``exclude`` narrow the teleportable layers by glob (:func:`select_layers`).

    Returns:
        (layers, excluded): the teleportable layers in module order as ``(spec, module)``
        pairs (``module`` is the module to hook and to reach the weight from), and the
        excluded modules with their reason.

    Raises:
        ConfigError: a glob of ``include`` or ``exclude`` that matches no teleportable layer.
    """
    holders: dict[int, dict[int, str]] = {}  # parameter id -> {module id: module name}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), {}).setdefault(id(module), name)

    def tied(module: nn.Module, p: torch.Tensor | None) -> list[str]:
        return [n for m, n in holders.get(id(p), {}).items() if m != id(module)] if p is not None else []

    layers: list[tuple[LayerSpec, nn.Module]] = []
    excluded: list[Excluded] = []
    skip: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in skip:
            continue
        att = attention_specs(name, module)
        if att is not None:
            skip |= {id(m) for m in module.modules()}
            for spec, problem in att:
                p = module.get_parameter(spec.param)
                reason = problem or _exclusion(module, p, tied(module, p) if spec.param != "out_proj.weight" else tied(module.out_proj, p))
                if reason:
                    excluded.append(Excluded(spec.name, spec.kind, reason))
                else:
                    layers.append((spec, module))
            continue
        kind = _kind_of(module)
        if kind is None:
            if any(p is not None for p in module._parameters.values()):
                excluded.append(Excluded(name, *_other_reason(module)))
            continue
        if parametrize.is_parametrized(module):  # its ParametrizationList holds the stored tensors
            skip |= {id(m) for m in module.parametrizations.modules()}
        if parametrize.is_parametrized(module, "weight"):
            excluded.append(Excluded(name, kind, "weight is parametrized (weight_norm or torch.nn.utils.parametrize): the stored tensors are not the weight"))
            continue
        w = module._parameters.get("weight")
        reason = _exclusion(module, w, tied(module, w))
        if reason:
            excluded.append(Excluded(name, kind, reason))
        else:
            layers.append((spec_of(name, module), module))
    return select_layers(layers, excluded, tuple(include), tuple(exclude))
