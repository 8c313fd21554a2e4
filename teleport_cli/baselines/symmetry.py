"""Symmetry teleportation for the built-in MLP (Zhao, Dehmamy, Walters, Yu, "Symmetry
Teleportation for Accelerated Optimization", NeurIPS 2022, Sec. 4): a baseline.

The group: for each hidden layer i with weights ``(W_i, b_i)`` (``k_i`` units, PyTorch layout
``(k_i, d_in)``) followed by layer i+1 with weight ``W_{i+1}``, an element ``g_i = I + T_i`` of
``GL(k_i)`` acts, with the pre-activations ``Z_i = W_i X_i + b_i`` (``k_i x n``, columns are
samples) of a calibration batch ``X_i``, as

    W_i' = g_i W_i,   b_i' = g_i b_i,
    W_{i+1}' = W_{i+1} S S'^+ + W_{i+1} (I - S' S'^+),   S = sigma(Z_i), S' = sigma(g_i Z_i),

(``^+``: Moore-Penrose pseudo-inverse). The first term is the paper's data-dependent action
``W_{i+1} sigma(Z) sigma(gZ)^+``; the second is zero when ``S'`` is square and invertible (the
paper's setting, ``n = k_i``) and keeps ``W_{i+1}`` unchanged outside the span of the new
activations when ``n < k_i`` (without it, ``g = I`` would already project ``W_{i+1}`` onto the
span of ``n`` activation vectors and change the model on all other inputs). Both give
``W_{i+1}' S' = W_{i+1} S`` whenever ``S'`` has full column rank, i.e. the batch's outputs are
unchanged EXACTLY when the batch has at most ``k_i`` samples (and no sample's activations are
linearly dependent on the others'); on any other input the action is only approximate: the loss
on the whole calibration set drifts and is held within ``config.tolerance`` by backtracking.
Elements of consecutive layers apply in sequence: layer i's input is layer i-1's new output.

The objective is ``1/2 ||grad L||^2`` over ALL trainable parameters and the WHOLE calibration
set, at the transformed parameters; its gradient with respect to the ``T_i`` is taken by torch
autograd through the action (a double backward through ``pinv``), in float64.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..config import TeleportConfig
from ..errors import ConfigError
from ..models.builtin import MLP
from ..nullspace.derivatives import Batches, full_gradient
from ..nullspace.linesearch import StepLog, gradient_norm_step
from ..records import StepRecord, TeleportStats

Params = dict[str, torch.Tensor]
# activations with singular values below this share of the largest count as rank-deficient
RCOND = 1e-3


def check_mlp(model: nn.Module) -> None:
    """Raises: ConfigError: ``model`` is not the built-in :class:`~teleport_cli.models.builtin.MLP`."""
    if not isinstance(model, MLP) or len(model.hidden) == 0:
        raise ConfigError("symmetry teleportation needs the built-in mlp architecture", hint="use --method levelset or the null-space teleport")


def widths(model: MLP) -> list[int]:
    """Hidden widths ``k_i`` (the sizes of the groups ``GL(k_i)``)."""
    return [layer.out_features for layer in model.hidden]


def act(model: MLP, params: Params, ts: Sequence[torch.Tensor], x: torch.Tensor) -> Params:
    """The group action ``(g_0, g_1, ...) . params`` with ``g_i = I + ts[i]`` on batch ``x``.

    Args:
        model: the MLP (its structure only; its weights are not read).
        params: ``name -> tensor`` for every parameter of ``model`` (any float dtype).
        ts: one ``(k_i, k_i)`` tensor per hidden layer, same dtype as ``params``.
        x: ``(n, in_features)`` calibration inputs the action depends on (``n <= min k_i`` for
            exactness).

    Returns:
        a new dict (differentiable in ``ts`` and ``params``); ``head.bias`` is never changed.
    """
    out = dict(params)
    h = x.flatten(1).to(next(iter(params.values())).dtype)
    names = [f"hidden.{i}" for i in range(len(model.hidden))] + ["head"]
    for i, t in enumerate(ts):
        w, b, nxt = out[f"{names[i]}.weight"], out[f"{names[i]}.bias"], f"{names[i + 1]}.weight"
        g = torch.eye(t.shape[0], dtype=t.dtype, device=t.device) + t
        z = h @ w.T + b  # (n, k)
        s, s_new = torch.relu(z).T, torch.relu(z @ g.T).T  # (k, n)
        pinv = torch.linalg.pinv(s_new)  # (n, k)
        wn = out[nxt]
        out[f"{names[i]}.weight"], out[f"{names[i]}.bias"] = g @ w, g @ b
        out[nxt] = wn + (wn @ (s - s_new)) @ pinv
        h = s_new.T
    return out


def objective(model: MLP, params: Params, ts: Sequence[torch.Tensor], x: torch.Tensor, batches: Batches, loss_fn: Callable, n: int) -> torch.Tensor:
    """``1/2 ||grad L(act(params, ts))||^2`` (float64 scalar, differentiable in ``ts``).

    ``L`` is the mean calibration loss over all of ``batches`` (``n`` samples in total); the
    gradient covers every parameter. Inputs are cast to the parameters' dtype.
    """
    moved = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in act(model, params, ts, x).items()}
    keys = list(moved)
    grads = [torch.zeros_like(moved[k]) for k in keys]
    dtype = moved[keys[0]].dtype
    for xb, yb in batches:
        loss = loss_fn(functional_call(model, moved, (xb.to(dtype),)), yb) / n
        gs = torch.autograd.grad(loss, [moved[k] for k in keys], create_graph=True)
        grads = [a + g for a, g in zip(grads, gs)]
    return 0.5 * sum((g**2).sum() for g in grads)


def action_subset(model: MLP, batches: Batches, seed: int, rcond: float = RCOND) -> torch.Tensor:
    """The action's data: a seeded subset of ``n <= min k_i`` calibration inputs, ``(n, ...)`` float64.

    ``n`` starts at the smallest hidden width and shrinks to the smallest numerical rank
    (singular values above ``rcond`` times the largest) of the hidden activations
    ``sigma(Z_i)`` on the subset, until every layer's activations have full column rank:
    the condition for an exact action. Dead ReLU units lower that rank; without this,
    ``pinv`` of a nearly singular ``sigma(gZ)`` blows ``W_{i+1}`` up off the data.
    """
    xs = torch.cat([x for x, _ in batches]).double().flatten(1)
    perm = torch.randperm(xs.shape[0], generator=torch.Generator().manual_seed(seed)).to(xs.device)
    n = min(min(widths(model)), xs.shape[0])
    while True:
        x = xs[perm[:n].sort().values]
        h, rank = x, n
        with torch.no_grad():
            for layer in model.hidden:
                h = torch.relu(h @ layer.weight.double().T + layer.bias.double())
                rank = min(rank, int(torch.linalg.matrix_rank(h, rtol=rcond)))
        if rank >= n or rank == 0:
            return x
        n = rank


def symmetry_teleport(
    model: nn.Module,
    batches: Batches,
    config: TeleportConfig,
    loss_fn: Callable,
    *,
    noise_floor: float = 0.0,
    on_step: Callable[[int, StepRecord | None, StepLog], None] | None = None,
) -> TeleportStats:
    """Run symmetry teleportation on the built-in MLP ``model`` in place.

    Each step: ``D_i = d/dT_i 1/2 ||grad L||^2`` at ``T = 0`` (float64 autograd through
    :func:`act`), a normalised step ``T = eta * ||I|| * D / ||D||`` (``||I||^2 = sum k_i``), the
    action applied to the current weights; accepted when the calibration-loss drift from the
    start is within ``config.tolerance`` (:func:`~teleport_cli.nullspace.linesearch.drift_ok`) and the
    gradient norm grew, else ``eta`` halves (``config.max_backtracks``). The action's data is a
    seeded subset (``config.seed``) of at most ``min k_i`` calibration inputs
    (:func:`action_subset`); drift is judged on the whole calibration set (model's dtype).

    Args:
        model: the model to move (a copy), an :class:`~teleport_cli.models.builtin.MLP`, eval mode.
        batches: re-iterable calibration batches.
        config: ``steps``, ``step_size``, ``tolerance``, ``max_backtracks``, ``target_ratio``, ``seed``.
        loss_fn: summed batch loss.

    Returns:
        :class:`~teleport_cli.records.TeleportStats` (objective ``symmetry``).

    Raises:
        ConfigError: ``model`` is not the built-in MLP.
    """
    check_mlp(model)
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    named = dict(model.named_parameters())
    n = sum(int(x.shape[0]) for x, _ in batches)
    ks = widths(model)
    x_act = action_subset(model, batches, config.seed)
    state = full_gradient(model, batches, loss_fn, params, n)
    loss0, gnorm0 = state.loss, state.grad_norm
    eta = config.step_size
    log = StepLog(config.target_ratio, gnorm0, on_step)
    stop = "steps"
    while log.accepted < config.steps:
        base = {k: p.detach().double() for k, p in named.items()}
        ts = [torch.zeros(k, k, dtype=torch.float64, device=x_act.device, requires_grad=True) for k in ks]
        d = torch.autograd.grad(objective(model, base, ts, x_act, batches, loss_fn, n), ts)
        dnorm = math.sqrt(sum(float((t**2).sum()) for t in d))
        if dnorm == 0.0 or not math.isfinite(dnorm):
            stop = "no_freedom"
            break

        def propose(eta: float):
            scale = eta * math.sqrt(sum(ks)) / dnorm
            with torch.no_grad():
                moved = act(model, base, [scale * t for t in d], x_act)
                for k, p in named.items():
                    p.copy_(moved[k].to(p.dtype))
            return full_gradient(model, batches, loss_fn, params, n)

        state, eta, ended = gradient_norm_step(params, state, loss0, propose, eta, config, noise_floor, log)
        if ended:
            stop = ended
            break
    return log.stats(loss0, state, stop, start, "symmetry", 0.5 * gnorm0**2, 0.5 * state.grad_norm**2)
