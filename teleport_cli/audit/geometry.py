"""Loss-landscape geometry of a model on the WHOLE calibration set: gradient norm, curvature, sharpness.

All figures are of the mean calibration loss ``L(theta) = (1/N) sum_n l(f(x_n), y_n)`` with
respect to all trainable parameters ``theta`` (P numbers), computed from the same streamed
full gradient and Hessian-vector products as the teleport objective
(:func:`teleport_cli.nullspace.derivatives.full_gradient`, :func:`~teleport_cli.nullspace.derivatives.hessian_vector_product`,
which runs scaled-dot-product attention on the math backend: fused kernels have no double
backward). No P x P matrix is ever formed.

* gradient norm ``||grad L||_2``;
* top Hessian eigenvalue (largest algebraic, not largest magnitude) by the Lanczos method
  (Lanczos 1950; Golub & Van Loan, *Matrix Computations*, Sec. 10.1) with full
  reorthogonalisation while the basis fits in ``REORTH_BUDGET`` numbers. Its residual
  ``|beta_k s_k|`` bounds the distance from the reported value to an eigenvalue of H
  (Parlett, *The Symmetric Eigenvalue Problem*, Thm. 13.1.1);
* Hutchinson's estimate of ``trace(H)`` (Hutchinson 1990): the mean of ``v^T H v`` over
  Rademacher probes ``v``, with its standard error ``std / sqrt(probes)``;
* SAM-style sharpness at radius rho (Foret et al., ICLR 2021, Eq. 2 with the first-order
  maximiser): ``L(theta + rho g / ||g||) - L(theta)``; rho is in parameter units (L2 norm
  over all P parameters).

The own code (rather than curvlinops-for-pytorch) is explained in docs/report.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..nullspace.derivatives import (
    Batches,
    count_samples,
    full_gradient,
    hessian_vector_product,
)
from ..nullspace.hvp import (
    HessianVectorProduct,
    full_precision_matmul,
    missing_double_backward,
)
from ..nullspace.verify import evaluate_loss
from ..records import _finite

# Lanczos keeps its basis (iterations x P numbers, one stacked tensor) for full
# reorthogonalisation only while it is at most this many numbers (512 MiB in float32); above it
# runs the three-term recurrence alone, which still finds the extreme eigenvalue (at worst with
# spurious repeated copies).
REORTH_BUDGET = 1 << 27
FALLBACK = "central differences (no double backward)"

# the relative precision of a top eigenvalue that only sets a learning rate
LR_RTOL = 1e-2

Vec = list[torch.Tensor]


@dataclass(frozen=True)
class Geometry:
    """Geometry of one model on one data set (all float64 figures, loss in nats).

    Attributes:
        loss: mean loss over the data set.
        grad_norm: ``||grad L||_2`` over all trainable parameters.
        parameters: P, the number of trainable parameters.
        top_eigenvalue: largest algebraic eigenvalue of the Hessian of L (Lanczos).
        eigenvalue_residual: ``|beta_k s_k|``: an exact eigenvalue lies within this distance.
        lanczos_iterations: Hessian-vector products spent on the eigenvalue.
        trace: Hutchinson estimate of ``trace(H)``; ``trace_stderr`` its standard error
            (``None`` with a single probe); ``trace_probes`` the number of probes.
        sharpness: ``L(theta + rho g/||g||) - L(theta)`` at ``sharpness_radius`` = rho.
        hvp: ``exact`` (double backward), or the labelled fallback ``central differences (no
            double backward)`` for models with an op torch cannot differentiate twice.
    """

    loss: float
    grad_norm: float
    parameters: int
    top_eigenvalue: float
    eigenvalue_residual: float
    lanczos_iterations: int
    trace: float
    trace_stderr: float | None
    trace_probes: int
    sharpness: float
    sharpness_radius: float
    hvp: str = "exact"

    def to_dict(self) -> dict:
        return {k: _finite(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def _dot(a: Vec, b: Vec) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _flat(vs: Vec, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).to(dtype) for v in vs])


def _unflat(flat: torch.Tensor, like: Vec) -> Vec:
    out, i = [], 0
    for t in like:
        out.append(flat[i : i + t.numel()].view(t.shape).to(t.dtype))
        i += t.numel()
    return out


def lanczos_top(
    matvec: Callable[[Vec], Vec],
    start: Vec,
    *,
    iterations: int = 20,
    rtol: float = 1e-4,
) -> tuple[float, float, int]:
    """Largest algebraic eigenvalue of a symmetric operator by the Lanczos method.

    The Lanczos vectors are rows of one stacked ``iterations x P`` tensor in the working dtype
    (the start vector's: float32 for a float32 model, float64 for a float64 one; half
    precision is promoted to float32), and each new vector is reorthogonalised against all
    earlier ones by two matrix-vector products with that basis (classical Gram-Schmidt twice:
    Giraud et al., Numer. Math. 2005, "twice is enough"). The k x k tridiagonal eigenproblem
    is solved in float64.

    Args:
        matvec: ``v -> H v`` on lists of tensors (the shapes and dtypes of ``start``).
        start: the start vector (any non-zero list of tensors; normalised here).
        iterations: at most this many products (capped at the dimension).
        rtol: stop once the residual ``|beta_k s_k| <= rtol * |theta|``: an eigenvalue of the
            operator then lies within ``rtol * |theta|`` of theta (Parlett, Thm. 13.1.1).
            1e-2 is what a learning rate needs (:func:`top_eigenvalue`).

    Returns:
        (theta, residual, products): the top Ritz value, the residual bound, products used.

    Raises:
        ValueError: ``start`` is zero.
    """
    dtype = torch.promote_types(start[0].dtype, torch.float32)
    q = _flat(start, dtype)
    dim = q.numel()
    norm = float(q.norm())
    if norm == 0:
        raise ValueError("the Lanczos start vector is zero")
    q = q / norm
    steps = min(iterations, dim)
    # rows are written one per product: pages of an untouched row are never committed
    basis = torch.empty(steps, dim, dtype=dtype, device=q.device) if steps * dim <= REORTH_BUDGET else None
    alphas: list[float] = []
    betas: list[float] = []
    q_prev: torch.Tensor | None = None
    theta, residual = 0.0, float("inf")
    for k in range(steps):
        if basis is not None:
            basis[k] = q
        w = _flat(matvec(_unflat(q, start)), dtype)
        alpha = float(torch.dot(q, w))
        w -= alpha * q
        if q_prev is not None:
            w -= betas[-1] * q_prev
        if basis is not None:  # full reorthogonalisation, twice
            b = basis[: k + 1]
            w -= b.T @ (b @ w)
            w -= b.T @ (b @ w)
        beta = float(w.norm())
        alphas.append(alpha)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if k:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        theta = float(evals[-1])
        residual = abs(beta * float(evecs[-1, -1]))
        if residual <= rtol * abs(theta) or beta <= 1e-12 * max(abs(theta), 1e-300):
            return theta, residual, k + 1
        betas.append(beta)
        q_prev, q = q, w / beta
    return theta, residual, len(alphas)


def _rademacher(params: Sequence[torch.Tensor], gen: torch.Generator) -> Vec:
    return [(torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8) * 2 - 1).to(p.device, p.dtype) for p in params]


def hutchinson_trace(matvec: Callable[[Vec], Vec], params: Sequence[torch.Tensor], probes: int, gen: torch.Generator) -> tuple[float, float | None]:
    """Hutchinson's estimate of ``trace(H)`` and its standard error over Rademacher probes.

    Returns:
        (mean of ``v^T H v``, sample standard deviation / sqrt(probes); None for one probe).
    """
    values = torch.tensor([_dot(v, matvec(v)) for v in (_rademacher(params, gen) for _ in range(probes))], dtype=torch.float64)
    stderr = float(values.std(unbiased=True) / probes**0.5) if probes > 1 else None
    return float(values.mean()), stderr


@torch.no_grad()
def sam_sharpness(model: nn.Module, batches: Batches, loss_fn: Callable, params: Sequence[torch.Tensor], grads: Vec, radius: float) -> float:
    """``L(theta + rho g/||g||) - L(theta)``, both losses by the same no-grad pass; the
    parameters are restored exactly afterwards."""
    gnorm = _dot(grads, grads) ** 0.5
    if gnorm == 0:
        return 0.0
    loss = evaluate_loss(model, batches, loss_fn)
    saved = [p.detach().clone() for p in params]
    try:
        for p, g in zip(params, grads):
            p.add_(g, alpha=radius / gnorm)
        return evaluate_loss(model, batches, loss_fn) - loss
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)


def measure(
    model: nn.Module,
    batches: Batches,
    loss_fn: Callable,
    *,
    iterations: int = 20,
    probes: int = 16,
    radius: float = 0.05,
    seed: int = 0,
    rtol: float = 1e-4,
) -> Geometry:
    """Gradient norm, top Hessian eigenvalue, Hutchinson trace and sharpness of ``model``.

    The model must be in eval mode on the device of ``batches``; its weights are unchanged on
    return. Costs ``iterations + probes`` Hessian-vector products and two gradient/loss passes
    over the data set.

    Args:
        batches: re-iterable ``(inputs, targets)`` batches: the whole data set.
        loss_fn: summed loss of a batch, ``(logits, targets) -> scalar``.
        iterations: Lanczos steps at most; probes: Hutchinson probes; radius: SAM rho.
        seed: seeds the Lanczos start vector and the probes.

    Raises:
        ValueError: the model has no trainable parameter, or ``probes`` < 1.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if probes < 1:
        raise ValueError("probes must be at least 1")
    n = count_samples(batches)
    state = full_gradient(model, batches, loss_fn, params, n)

    used = ["exact"]
    fallback = HessianVectorProduct("central")

    def hvp(v: Vec) -> Vec:
        if used[0] == "exact":
            try:
                return hessian_vector_product(model, batches, loss_fn, params, v, params, n)
            except RuntimeError as e:  # e.g. hardsigmoid: no double backward in torch
                if not missing_double_backward(e):
                    raise
                used[0] = FALLBACK
        return fallback(model, batches, loss_fn, params, v, params, n)

    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype) for p in params]
    top, residual, iters = lanczos_top(hvp, start, iterations=iterations, rtol=rtol)
    trace, stderr = hutchinson_trace(hvp, params, probes, gen)
    sharp = sam_sharpness(model, batches, loss_fn, params, state.grads, radius)
    return Geometry(
        state.loss, state.grad_norm, sum(p.numel() for p in params), top, residual, iters, trace, stderr, probes, sharp, radius, used[0]
    )


def top_eigenvalue(model: nn.Module, batches: Batches, loss_fn: Callable, *, iterations: int = 20, seed: int = 0,
                   hvp: HessianVectorProduct | None = None, rtol: float = LR_RTOL, grads: Vec | None = None) -> float:
    """Largest Hessian eigenvalue of the loss over all ``batches`` (Lanczos on HVPs, all trainable parameters).

    To ``rtol`` relative (default :data:`LR_RTOL` = 1e-2: the precision a learning rate such as
    the look-ahead's ``1 / lambda_max`` or the SGD edge ``2 (1 + momentum) / lr`` needs).
    ``hvp``: how the products are taken (:class:`~teleport_cli.nullspace.hvp.HessianVectorProduct`;
    a forward difference reuses one gradient at the model's point); default: double backward.
    ``grads``: that gradient (one tensor per trainable parameter, over the same ``batches``, in full
    fp32), when the caller has it already; None: computed here.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n = count_samples(batches)
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype) for p in params]
    if hvp is None:
        top, _, _ = lanczos_top(lambda v: hessian_vector_product(model, batches, loss_fn, params, v, params, n), start,
                                iterations=iterations, rtol=rtol)
        return top
    if grads is None:
        with full_precision_matmul():
            grads = full_gradient(model, batches, loss_fn, params, n).grads
    top, _, _ = lanczos_top(lambda v: hvp(model, batches, loss_fn, params, v, params, n, grads=grads), start,
                            iterations=iterations, rtol=rtol)
    return top


def stability_check(before: float, after: float, lr: float, momentum: float = 0.0) -> dict:
    """Compare top Hessian eigenvalues with the edge of stability of (heavy-ball) SGD, ``2 (1 + beta) / lr``.

    Plain gradient descent on a quadratic diverges along an eigen-direction with eigenvalue
    ``lambda > 2 / lr``; heavy-ball momentum beta moves the edge to ``2 (1 + beta) / lr``.
    Adaptive optimizers (Adam) rescale per coordinate: this check does not cover them.
    """
    edge = 2.0 * (1.0 + momentum) / lr
    return {
        "lr": lr,
        "momentum": momentum,
        "edge": edge,
        "top_eigenvalue_before": before,
        "top_eigenvalue_after": after,
        "unstable_after": bool(after > edge),
        "crossed": bool(after > edge >= before),
        "note": "the edge 2(1+momentum)/lr holds for SGD and heavy-ball momentum, not for adaptive optimizers such as Adam",
    }
