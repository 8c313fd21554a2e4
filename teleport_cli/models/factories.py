"""Models named on the command line: a timm name or a user's ``package.module:factory``.

Only the command line may name code to import (``--model package.module:factory``); a
checkpoint's metadata may name built-in or timm architectures only
(:func:`teleport_cli.models.builtin.model_from_metadata` refuses anything else), so that opening a
``.safetensors`` file never runs code.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError, InputError
from .builtin import build_model, model_from_metadata


@dataclass
class ModelChoice:
    """The model to rebuild and where its name came from.

    Attributes:
        model: the freshly built module (random init; the caller loads the state dict).
        arch: the architecture name (built-in, timm name, or ``package.module:factory``).
        kwargs: the keyword arguments it was built with.
        origin: ``metadata`` (from the checkpoint), ``flag`` (``--model NAME``) or
            ``factory`` (``--model package.module:factory``).
    """

    model: nn.Module
    arch: str
    kwargs: dict
    origin: str


def parse_kwargs(text: str | None, what: str = "--model-kwargs") -> dict | None:
    """A JSON object given on the command line (None when not given).

    Raises:
        ConfigError: not valid JSON, or not an object (a bad option value: exit 2).
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} is not valid JSON ({e.msg})", hint='pass an object such as \'{"num_classes": 10}\'') from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a JSON object, not {type(value).__name__}", hint='pass an object such as \'{"num_classes": 10}\'')
    return value


def import_factory(spec: str):
    """Import ``package.module:attribute`` and return the attribute (it must be callable).

    Raises:
        InputError: malformed spec, the module cannot be imported, or no such callable.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"--model {spec!r} is not of the form package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure of the user's module is a bad input
        raise InputError(f"--model {spec}: cannot import module {module_name!r} ({type(e).__name__}: {e})", hint="is it on PYTHONPATH?") from None
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise InputError(f"--model {spec}: module {module_name!r} has no attribute {attr!r}")
    if not callable(obj):
        raise InputError(f"--model {spec}: {attr!r} is not callable")
    return obj


def choose_model(metadata: dict[str, str], source: str, model: str | None = None, model_kwargs: str | dict | None = None) -> ModelChoice:
    """Build the model from ``--model``/``--model-kwargs`` or, without them, from the metadata.

    Args:
        metadata: the checkpoint's safetensors metadata.
        source: the checkpoint path (for messages).
        model: ``--model``: a built-in or timm name, or ``package.module:factory``.
        model_kwargs: ``--model-kwargs`` as JSON text or a dict; replaces the metadata's
            ``model_kwargs`` (with ``--model`` and without it).

    Raises:
        InputError: unknown name, bad kwargs, a factory that fails or returns no ``nn.Module``,
            metadata naming code.
    """
    kwargs = parse_kwargs(model_kwargs) if isinstance(model_kwargs, (str, type(None))) else dict(model_kwargs)
    if model is None:
        meta = dict(metadata)
        if kwargs is not None:
            meta["model_kwargs"] = json.dumps(kwargs)
        built, arch, kw = model_from_metadata(meta, source)
        return ModelChoice(built, arch, kw, "metadata")
    kwargs = kwargs or {}
    if ":" not in model:
        return ModelChoice(build_model(model, kwargs), model, kwargs, "flag")
    factory = import_factory(model)
    try:
        built = factory(**kwargs)
    except TypeError as e:
        raise InputError(f"--model {model} does not accept these --model-kwargs: {e}") from None
    if not isinstance(built, nn.Module):
        raise InputError(f"--model {model} returned {type(built).__name__}, not a torch.nn.Module")
    return ModelChoice(built, model, kwargs, "factory")
