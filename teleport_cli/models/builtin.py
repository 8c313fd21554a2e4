"""Model specifications to ``nn.Module``, and strict loading of state dicts.

A checkpoint's metadata names its architecture: ``arch`` (a built-in name such as ``mlp`` or
``char_lm``, or any timm model name) and ``model_kwargs`` (JSON). Metadata may only name
built-in or timm architectures, never import code: a data file must not be able to run code.
A user's own ``nn.Module`` comes from the command line only (``--model package.module:factory``,
see :mod:`teleport_cli.factories`).
"""

from __future__ import annotations

import json
from typing import Callable

import torch
from torch import nn

from .charlm import CharLM
from .errors import ConfigError, InputError


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
        ckpt: a :class:`~teleport_cli.formats.base.LoadedCheckpoint`.
        files: :class:`~teleport_cli.training_state.FileOptions` (which weights; EMA policy).
        like: build from this metadata instead of the checkpoint's.
        model_spec, model_kwargs: ``--model`` and ``--model-kwargs`` (they override the metadata).
        module: an already built model (library use); its arch and kwargs are recorded only if
            the checkpoint names them.

    Returns:
        (:class:`~teleport_cli.factories.ModelChoice` holding the loaded model,
        :class:`~teleport_cli.training_state.Plan` with every weight set's key map).

    Raises:
        InputError: no or unknown architecture, tensors that do not fit, ``ema`` asked for on a
            checkpoint without EMA weights, EMA weights to re-seed that do not fit.
    """
    from .factories import ModelChoice, choose_model
    from .training_state import model_state, plan

    chosen = plan(ckpt, files)
    if module is None:
        choice = choose_model(ckpt.metadata if like is None else like, ckpt.path, model_spec, model_kwargs)
    else:
        choice = ModelChoice(module, ckpt.metadata.get("arch"), ckpt.metadata.get("model_kwargs"), "module")
    load_strict(choice.model, model_state(chosen, choice.model), ckpt.path)
    return choice, chosen


def load_model(path, *, weights: str = "state_dict", trust_pickle: bool = False, like: dict | None = None,
               model_spec: str | None = None, model_kwargs: str | dict | None = None,
               read: "LoadedCheckpoint | None" = None) -> tuple[nn.Module, "LoadedCheckpoint", str, dict]:
    """Read a checkpoint, rebuild its model from the metadata and load one weight set strictly.

    The same reading as ``teleport apply``: any container of :mod:`teleport_cli.formats`,
    wrapper prefixes (``module.``, ``_orig_mod.``) removed, tied weights filled in.

    Args:
        path: checkpoint file or folder.
        weights: ``state_dict`` (the training weights) or ``ema`` (the EMA weights).
        trust_pickle: unpickle without the weights-only restriction (runs code from the file).
        like: build the model from this metadata instead of the file's (a second checkpoint
            of the same architecture that does not name one).
        model_spec, model_kwargs: ``--model`` and ``--model-kwargs``
            (:func:`teleport_cli.factories.choose_model`); they override the metadata.
        read: ``path`` already read (not read again).

    Returns:
        (model in eval mode on the CPU, the checkpoint as read, arch, model_kwargs).

    Raises:
        InputError: unreadable file, no or unknown architecture, tensors that do not fit,
            ``weights="ema"`` on a checkpoint without EMA weights.
    """
    from .formats import read_checkpoint
    from .training_state import FileOptions

    ckpt = read if read is not None else read_checkpoint(path, trust_pickle=trust_pickle)
    files = FileOptions(weights=weights, trust_pickle=trust_pickle, keep_ema=weights != "ema")  # read only: no EMA is re-seeded
    choice, _ = load_weights(ckpt, files, like=like, model_spec=model_spec, model_kwargs=model_kwargs)
    return choice.model.eval(), ckpt, choice.arch, choice.kwargs


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``.

    Raises:
        ConfigError: ``cuda`` asked for on a machine without a usable GPU (exit 2).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available", hint="use --device cpu or auto")
    return torch.device(name)
