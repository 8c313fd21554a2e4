"""Hugging Face transformers folders rebuilt from their own ``config.json``, returning logits.

A folder written by ``save_pretrained`` names its architecture (``architectures``,
``model_type``). The model is rebuilt with transformers' Auto classes from that config only:
``AutoConfig.from_pretrained(folder, local_files_only=True)``, then
``AutoModelForCausalLM`` / ``ForSequenceClassification`` / ``ForImageClassification`` /
``ForMaskedLM`` ``.from_config`` (random init; the caller loads the folder's weights strictly).
No network, and ``trust_remote_code`` is never set: a config that needs remote code
(``auto_map``, a ``model_type`` transformers does not know) is refused.

The model's class is swapped for a thin subclass whose ``forward(x)`` returns
``ModelOutput.logits``: the module tree and the state-dict keys stay exactly those of the
transformers model. Token inputs are ``(N, T)`` int64 ids with ``-1`` at padded positions
(the attention mask is ``x >= 0``; :meth:`LogitsForward.token_mask` tells the Gram capture
which rows are real); images are ``(N, C, H, W)`` float ``pixel_values``. Attention runs in
transformers' ``eager`` implementation, which has the double backward the Hessian-vector
products need.

``transformers`` is an optional extra: ``pip install 'teleport-cli[hf]'``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError

EXTRA = "pip install 'teleport-cli[hf]'"
AUTO_CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "image_classification": "AutoModelForImageClassification",
    "masked_lm": "AutoModelForMaskedLM",
}
TEXT_CONTEXT = 128  # longest window a --data text.txt is cut into (or the model's own, if shorter)


def _transformers(source: str):
    try:
        import transformers
    except ImportError:
        raise InputError(f"{source} is a Hugging Face transformers folder, but transformers is not installed", hint=EXTRA) from None
    return transformers


class LogitsForward:
    """Mixin placed before a transformers model class: ``forward(x)`` returns the logits.

    Attributes set by :func:`build_transformers_model`: ``hf_task`` (a key of
    :data:`AUTO_CLASSES`), ``hf_folder`` (the checkpoint folder: tokenizer and preprocessor),
    ``hf_context`` (window length for text data).
    """

    hf_task: str = "causal_lm"
    hf_folder: str = ""
    hf_context: int = TEXT_CONTEXT

    def token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """``(N, T)`` bool, False at padded positions (ids ``-1``); None for image inputs."""
        return None if x.is_floating_point() else x >= 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401 - the logits
        """Logits: ``(N, T, V)`` for language models, ``(N, C)`` for classifiers."""
        if x.is_floating_point():
            return super().forward(pixel_values=x, return_dict=True).logits
        mask = x >= 0
        kwargs = {"use_cache": False} if self.hf_task == "causal_lm" else {}
        out = super().forward(input_ids=x.clamp(min=0), attention_mask=mask.long(), return_dict=True, **kwargs)
        return out.logits


_CLASSES: dict[type, type] = {}


def logits_model(model: nn.Module) -> nn.Module:
    """Swap ``model``'s class for its :class:`LogitsForward` subclass (same modules and keys)."""
    cls = type(model)
    if issubclass(cls, LogitsForward):
        return model
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (LogitsForward, cls), {"__module__": __name__})
    model.__class__ = _CLASSES[cls]
    return model


def refusal(config: dict, source: str, known_model_types) -> str | None:
    """Why a ``config.json`` cannot be rebuilt without remote code, or None."""
    if config.get("auto_map"):
        return f"{source}: config.json has an auto_map ({', '.join(sorted(config['auto_map']))}): the model needs remote code, which is never run (trust_remote_code stays off)"
    mt = config.get("model_type")
    if mt not in known_model_types:
        return f"{source}: model_type {mt!r} is not a transformers architecture this version knows: it would need remote code, which is never run"
    return None


def build_transformers_model(folder: str | Path, info: dict) -> nn.Module:
    """Rebuild the model of a transformers folder from its ``config.json`` (random init, eval mode).

    Args:
        info: ``{"architecture", "model_type", "task"}`` as the folder reader found them.

    Raises:
        InputError: transformers is not installed (names the extra), the config needs remote
            code, the task is not one of :data:`AUTO_CLASSES`, or the config cannot be built.
    """
    source = str(folder)
    tf = _transformers(source)
    raw = json.loads((Path(folder) / "config.json").read_text())
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    why = refusal(raw, source, CONFIG_MAPPING)
    if why:
        raise InputError(why, hint="only architectures built into transformers are rebuilt; pass --model package.module:factory for others")
    task = info.get("task")
    if task not in AUTO_CLASSES:
        raise InputError(
            f"{source}: architecture {info.get('architecture')!r} is not a causal LM, sequence classifier, image classifier or masked LM",
            hint="pass --model package.module:factory returning a module whose forward gives the logits (see docs/transformers.md)",
        )
    try:
        config = tf.AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=False)
        model = getattr(tf, AUTO_CLASSES[task]).from_config(config, attn_implementation="eager", trust_remote_code=False)
    except (ValueError, KeyError, TypeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{source}: transformers cannot build this config ({first})", hint="is config.json from save_pretrained?") from None
    arch = info.get("architecture")
    if arch and type(model).__name__ != arch:
        raise InputError(f"{source}: config.json names {arch}, but {AUTO_CLASSES[task]} builds {type(model).__name__} for model_type {raw.get('model_type')!r}",
                         hint="is config.json consistent?")
    model = logits_model(model.eval())
    model.hf_task, model.hf_folder = task, source
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or TEXT_CONTEXT
    model.hf_context = int(min(positions, TEXT_CONTEXT))
    return model
