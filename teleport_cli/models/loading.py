"""Checkpoint to loaded model: build the architecture, load one weight set strictly.

The same reading for ``apply``, ``report``, ``inspect`` and ``bench``: any container of
:mod:`teleport_cli.checkpoints`, wrapper prefixes removed, tied weights filled in. A
transformers folder is rebuilt from its own ``config.json``
(:mod:`teleport_cli.models.transformers_adapter`), with no flags.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoints.containers import LoadedCheckpoint, read_checkpoint
from ..checkpoints.options import FileOptions
from ..checkpoints.training_state import model_state, plan
from ..errors import InputError
from .factories import ModelChoice, choose_model


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load every tensor; list all missing, unexpected and mis-shaped keys in one error.

    Raises:
        InputError: the state dict does not fit the model.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes))
    if problems:
        raise InputError(f"{source} does not fit the model: " + " | ".join(problems), hint="is the architecture right?")
    model.load_state_dict(state_dict, strict=True)


def load_weights(ckpt, files, *, like: dict | None = None, model_spec: str | None = None,
                 model_kwargs: str | dict | None = None, module: nn.Module | None = None):
    """Build the model of a checkpoint already read and load the chosen weight set strictly.

    Args:
        ckpt: a :class:`~teleport_cli.checkpoints.base.LoadedCheckpoint`.
        files: :class:`~teleport_cli.checkpoints.options.FileOptions` (which weights; EMA policy).
        like: build from this metadata instead of the checkpoint's.
        model_spec, model_kwargs: ``--model`` and ``--model-kwargs`` (they override the metadata).
        module: an already built model (library use); its arch and kwargs are recorded only if
            the checkpoint names them.

    Returns:
        (:class:`~teleport_cli.models.factories.ModelChoice` holding the loaded model,
        :class:`~teleport_cli.checkpoints.training_state.Plan` with every weight set's key map).

    Raises:
        InputError: no or unknown architecture, tensors that do not fit, ``ema`` asked for on a
            checkpoint without EMA weights, EMA weights to re-seed that do not fit.
    """
    chosen = plan(ckpt, files)
    hf = ckpt.container.layout.get("transformers") if ckpt.container.layout else None
    if module is None and model_spec is None and hf is not None:
        from .transformers_adapter import build_transformers_model

        choice = ModelChoice(build_transformers_model(ckpt.path, hf), ckpt.metadata["arch"], {}, "transformers config")
    elif module is None:
        choice = choose_model(ckpt.metadata if like is None else like, ckpt.path, model_spec, model_kwargs)
    else:
        choice = ModelChoice(module, ckpt.metadata.get("arch"), ckpt.metadata.get("model_kwargs"), "module")
    state = model_state(chosen, choice.model)
    check_parameters_finite(choice.model, state, ckpt.path)
    load_strict(choice.model, state, ckpt.path)
    return choice, chosen


def check_parameters_finite(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN or Inf in the state dict's parameters; buffers may hold ±Inf (causal masks).

    Raises:
        InputError: a parameter of ``model`` holds NaN or Inf in ``state`` (the keys are named).
    """
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    bad = [k for k, t in state.items() if k in params and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise InputError(f"{source}: NaN or Inf in {', '.join(sorted(bad)[:8])}{more} (parameters must be finite)",
                         hint="a checkpoint with non-finite weights cannot be teleported; use an earlier one")


def load_model(path, *, weights: str = "state_dict", trust_pickle: bool = False, like: dict | None = None,
               model_spec: str | None = None, model_kwargs: str | dict | None = None,
               read: "LoadedCheckpoint | None" = None) -> tuple[nn.Module, "LoadedCheckpoint", str, dict]:
    """Read a checkpoint, rebuild its model from the metadata and load one weight set strictly.

    The same reading as ``teleport apply``: any container of :mod:`teleport_cli.checkpoints.containers`,
    wrapper prefixes (``module.``, ``_orig_mod.``) removed, tied weights filled in.

    Args:
        path: checkpoint file or folder.
        weights: ``state_dict`` (the training weights) or ``ema`` (the EMA weights).
        trust_pickle: unpickle without the weights-only restriction (runs code from the file).
        like: build the model from this metadata instead of the file's (a second checkpoint
            of the same architecture that does not name one).
        model_spec, model_kwargs: ``--model`` and ``--model-kwargs``
            (:func:`teleport_cli.models.factories.choose_model`); they override the metadata.
        read: ``path`` already read (not read again).

    Returns:
        (model in eval mode on the CPU, the checkpoint as read, arch, model_kwargs).

    Raises:
        InputError: unreadable file, no or unknown architecture, tensors that do not fit,
            ``weights="ema"`` on a checkpoint without EMA weights.
    """
    ckpt = read if read is not None else read_checkpoint(path, trust_pickle=trust_pickle)
    files = FileOptions(weights=weights, trust_pickle=trust_pickle, keep_ema=weights != "ema")  # read only: no EMA is re-seeded
    choice, _ = load_weights(ckpt, files, like=like, model_spec=model_spec, model_kwargs=model_kwargs)
    return choice.model.eval(), ckpt, choice.arch, choice.kwargs
