"""A small causal character-level transformer language model (built-in architecture ``char_lm``).

Pre-norm GPT-style blocks (Radford et al. 2019) whose attention is written with explicit
``nn.Linear`` modules (``attn.qkv``: fused query/key/value projection, ``attn.proj``: output
projection) and an explicit softmax, so that forward hooks see every projection and the
Hessian-vector products of the teleport need no fused attention kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused ``qkv`` Linear and a ``proj`` Linear.

    Input and output ``(N, T, d_model)``; position t attends to positions ``<= t``.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.n_heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharLM(nn.Module):
    """Causal character-level transformer language model.

    Args:
        vocab_size: number of distinct characters (token ids ``0 .. vocab_size-1``).
        context: longest sequence the learned position embedding covers.
        d_model: width of the residual stream.
        n_layers: number of transformer blocks.
        n_heads: attention heads per block.
        mlp_ratio: hidden width of the MLP as a multiple of ``d_model``.

    Input ``(N, T)`` int64 token ids with ``T <= context``; output ``(N, T, vocab_size)``
    float32 logits for the next token at every position. Raises ValueError for ``T > context``.
    """

    def __init__(self, vocab_size: int, context: int = 64, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, mlp_ratio: int = 4):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.context}")
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
