"""Which weights of a checkpoint move, and what its other training state becomes.

* Default: teleport ``state_dict`` (the weights training resumes from) and re-seed the EMA
  weights with the teleported ones: an exponential moving average of two unrelated points on
  the level set is meaningless, so after the teleport ``state_dict_ema`` equals ``state_dict``.
* ``--weights ema``: teleport the EMA weights instead (to fine-tune from them); ``state_dict``
  and the optimizer state, which belongs to it, stay as they are.
* ``--keep-ema``: teleport ``state_dict`` and leave the EMA weights untouched.
* The optimizer state (momentum, Adam moments) describes the old weights: it is dropped when
  ``state_dict`` moves, unless ``--keep-optimizer-state``. Epoch, scheduler, amp scaler, args
  and every other entry are kept.

Every tensor that did not move is written as read (bit-identical, same dtype and strides);
moved tensors are cast back to their stored dtype and memory layout; tied tensors stay tied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError, OutputError
from .base import LoadedCheckpoint, alias_groups, align_to_model
from .options import FileOptions
from .torchfile import OPTIMIZER_ENTRIES


@dataclass
class Plan:
    """The weight set to teleport and how each stored key maps to the model's key."""

    ckpt: LoadedCheckpoint
    options: FileOptions
    source: str
    ema: str | None
    key_maps: dict[str, dict[str, str]] = field(default_factory=dict)


def plan(ckpt: LoadedCheckpoint, options: FileOptions) -> Plan:
    """Choose the weight set to teleport.

    Raises:
        InputError: ``--weights ema`` on a checkpoint without EMA weights.
    """
    ema = ckpt.ema_name
    if options.weights == "ema" and ema is None:
        raise InputError(f"{ckpt.path} has no EMA weights (it has: {', '.join(ckpt.weights)})", hint="drop --weights ema")
    source = ema if options.weights == "ema" else next(iter(ckpt.weights))
    return Plan(ckpt, options, source, ema)


def _model_keys(model: nn.Module) -> tuple[set[str], list[list[str]]]:
    """All state-dict keys of the model and its groups of tied keys (same tensor object)."""
    by_id: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        by_id.setdefault(id(t), []).append(name)
    keys = set(model.state_dict(keep_vars=True))
    return keys, [g for g in by_id.values() if len(g) > 1]


def model_state(p: Plan, model: nn.Module) -> dict[str, torch.Tensor]:
    """The chosen weights under the model's key names, ready for strict loading.

    Wrapper prefixes are removed (also inner ``module.`` components that match the model);
    a tied key stored once (as ``safetensors.torch.save_model`` does) fills its partners.
    Every weight set's key map is recorded for writing back.

    Raises:
        InputError: the EMA weights that will be re-seeded have tensors whose shapes do not fit
            the model (found now, before any work, not when writing).
    """
    keys, tied = _model_keys(model)
    for name, ws in p.ckpt.weights.items():
        state, renames = align_to_model(ws.by_canonical(), keys)
        kmap = {k: renames.get(c, c) for k, c in ws.canonical.items()}
        if sum(k in keys for k in ws.tensors) > sum(m in keys for m in kmap.values()):
            kmap = {k: k for k in ws.tensors}  # the model itself has a submodule named module/_orig_mod
        p.key_maps[name] = kmap
    if p.ema is not None and p.ema != p.source and not p.options.keep_ema:
        shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
        kmap = p.key_maps[p.ema]
        bad = [f"{k} {tuple(t.shape)} vs {shapes[kmap[k]]}" for k, t in p.ckpt.weights[p.ema].tensors.items()
               if kmap[k] in shapes and tuple(t.shape) != shapes[kmap[k]]]
        if bad:
            raise InputError(f"{p.ckpt.path}: EMA weights {p.ema} do not fit the model: {'; '.join(bad)}",
                             hint="pass --keep-ema to leave them as they are, or fix the checkpoint")
    ws = p.ckpt.weights[p.source]
    state = {p.key_maps[p.source][k]: t for k, t in ws.tensors.items()}
    for group in tied:
        present = [k for k in group if k in state]
        if present:
            for k in group:
                state.setdefault(k, state[present[0]])
    return state


def cast_like(new: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """``new``'s values in ``stored``'s dtype, device and memory layout (e.g. channels_last)."""
    out = torch.empty_like(stored, memory_format=torch.preserve_format)
    out.copy_(new.detach().to(out.device))
    return out


def _set_out(p: Plan, name: str, values: dict[str, torch.Tensor], changed: set[str]) -> dict[str, torch.Tensor]:
    """The stored set ``name`` with ``values[model key]`` for the ``changed`` keys, ties kept."""
    ws = p.ckpt.weights[name]
    kmap = p.key_maps[name]
    out = {k: (cast_like(values[kmap[k]], t) if kmap[k] in changed else t) for k, t in ws.tensors.items()}
    for group in alias_groups(ws.tensors):
        first = out[group[0]]
        for k in group[1:]:
            if out[k] is not first and not torch.equal(out[k], first):
                raise OutputError(f"tied tensors {group[0]} and {k} would differ after the teleport", hint="this is a bug; please report it")
            out[k] = first
    return out


def assemble(p: Plan, new_state: dict[str, torch.Tensor], moved: set[str]) -> tuple[dict, dict, dict]:
    """The weight sets and entries to write, and what was done (for the report).

    Args:
        new_state: the teleported model's state dict (model key -> tensor, compute dtype).
        moved: model keys whose values changed (the teleported layers' weights).

    Returns:
        (sets, entries, actions) where actions has ``weights_moved``, ``ema`` and ``optimizer``.
    """
    sets = {name: dict(ws.tensors) for name, ws in p.ckpt.weights.items()}
    sets[p.source] = _set_out(p, p.source, new_state, moved)
    actions = {"container": p.ckpt.container.kind, "weights_moved": p.source, "ema": "none", "optimizer": "none"}
    if p.ema is not None and p.source != p.ema:
        if p.options.keep_ema:
            actions["ema"] = f"{p.ema} kept unchanged (--keep-ema)"
        else:
            moved_src = {p.key_maps[p.source][k]: t for k, t in sets[p.source].items()}
            ema_keys = set(p.key_maps[p.ema].values()) & set(moved_src)
            sets[p.ema] = _set_out(p, p.ema, moved_src, ema_keys)
            actions["ema"] = f"{p.ema} re-seeded with the teleported {p.source}"
    elif p.ema is not None:
        actions["ema"] = f"{p.ema} teleported (--weights ema)"
    entries = dict(p.ckpt.entries)
    present = [k for k in OPTIMIZER_ENTRIES if k in entries]
    if present:
        if p.source == p.ema:
            actions["optimizer"] = "kept (state_dict did not move)"
        elif p.options.keep_optimizer_state:
            actions["optimizer"] = "kept (--keep-optimizer-state); it describes the old weights"
        else:
            for k in present:
                del entries[k]
            actions["optimizer"] = "dropped: it describes the old weights (--keep-optimizer-state keeps it)"
    actions["kept_entries"] = [k for k in entries if k not in p.ckpt.weights]
    return sets, entries, actions


def moved_stored(p: Plan, sets: dict, moved: set[str]) -> dict[str, torch.Tensor]:
    """Model key -> the value as it will be written (stored dtype), for the moved keys."""
    kmap = p.key_maps[p.source]
    return {kmap[k]: t for k, t in sets[p.source].items() if kmap[k] in moved}


def stored_dtypes(p: Plan) -> dict[str, torch.dtype]:
    """Model key -> stored dtype of the weights to teleport, for the half-precision ones
    (float16, bfloat16): the teleport checks each step after rounding to it."""
    kmap = p.key_maps[p.source]
    return {kmap[k]: t.dtype for k, t in p.ckpt.weights[p.source].tensors.items() if t.dtype in (torch.float16, torch.bfloat16)}


def moved_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """State-dict keys whose values differ between the original and the teleported model.

    Compared value by value rather than derived from layer names, so that any weight a
    teleport moves (``weight``, ``in_proj_weight``, ``out_proj.weight``) is written, and
    every other tensor is written exactly as read.
    """
    return {k for k, v in after.items() if not torch.equal(v.detach().cpu(), before[k].detach().cpu())}
