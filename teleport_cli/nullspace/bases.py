"""Null-space bases of Gram matrices, and projection onto them (pure linear algebra).

A perturbation D of a layer's weight (``d_out x d_in``) leaves the layer's outputs on the
calibration set unchanged when ``D X^T = 0``, i.e. when every row of D lies in the null space
of the Gram ``A = X^T X`` (arXiv:2502.11362, Eq. 6-8; Saha et al., ICLR 2021, for the basis).
With ``A = V diag(s) V^T`` (s ascending):

* ``tau = 1``: null directions are the numerically zero eigenvalues,
  ``s_i <= d_in * eps_float64 * max(s)`` (the rule of ``numpy.linalg.matrix_rank``);
* ``tau < 1``: additionally the smallest directions whose eigenvalues sum to at most
  ``(1 - tau) * trace(A)``; the method is then approximately invariant.

The projection of a gradient G (``d_out x d_in``) is ``G N N^T`` with the null basis N, or
``G - G M M^T`` with the kept basis M; whichever basis is smaller is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS64 = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class GroupBasis:
    """The basis of one weight block: ``vectors`` is ``d_in x k`` float64 with orthonormal columns.

    If ``complement`` is False the columns span the null space; if True they span the kept
    (range) space and the projection is ``G - G M M^T``.
    """

    vectors: torch.Tensor
    complement: bool

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """Project the rows of ``g`` (``d_out x d_in``, any float dtype) onto the null space.

        Computed in float64 and returned in ``g``'s dtype: roundoff in a float32 projection
        leaks into the kept directions, and a normalised step would amplify that leak.
        """
        v = self.vectors.to(device=g.device)
        g64 = g.to(torch.float64)
        coeff = g64 @ v
        out = g64 - coeff @ v.T if self.complement else coeff @ v.T
        return out.to(g.dtype)


@dataclass(frozen=True)
class LayerBasis:
    """The null-space basis of one layer, one :class:`GroupBasis` per weight group.

    Attributes:
        eigenvalues: ``(groups, d_in)`` float64, ascending (for inspection and plots).
        rank: numerical rank of the Gram (summed over groups).
        null_dim: dimension of the null space at tau (summed over groups).
    """

    name: str
    groups: tuple[GroupBasis, ...]
    eigenvalues: torch.Tensor
    rank: int
    null_dim: int

    def project(self, blocks: torch.Tensor) -> torch.Tensor:
        """Project ``(groups, d_out, d_in)`` blocks onto the null space, group by group."""
        return torch.stack([gb.project(b) for gb, b in zip(self.groups, blocks)])


def null_mask(eigenvalues: torch.Tensor, tau: float) -> tuple[torch.Tensor, int]:
    """Which eigen-directions count as null at ``tau``, and the numerical rank.

    Args:
        eigenvalues: ``(d_in,)`` float64, ascending (from ``torch.linalg.eigh``).
        tau: fraction of the trace to keep, in (0, 1].

    Returns:
        (mask, rank): boolean ``(d_in,)`` mask of null directions; rank of the Gram.
    """
    s = eigenvalues.clamp_min(0.0)
    d = s.numel()
    top = s.max() if d else torch.tensor(0.0, dtype=s.dtype)
    zero = s <= d * EPS64 * top
    rank = int((~zero).sum())
    if tau >= 1.0:
        return zero, rank
    budget = (1.0 - tau) * s.sum()
    small = torch.cumsum(s, 0) <= budget
    return zero | small, rank


def symmetric_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric float64 matrix.

    LAPACK's divide-and-conquer driver behind ``torch.linalg.eigh`` occasionally fails to
    converge on Grams with large clusters of near-zero eigenvalues (seen with one thread on an
    864 x 864 conv Gram). Retry on the matrix scaled to max |a| = 1, then with numpy's eigh.
    """
    try:
        return torch.linalg.eigh(a)
    except torch.linalg.LinAlgError:
        pass
    scale = float(a.abs().max()) or 1.0
    try:
        s, v = torch.linalg.eigh(a / scale)
        return s * scale, v
    except torch.linalg.LinAlgError:
        import numpy as np

        s, v = np.linalg.eigh(a.detach().cpu().numpy())
        return torch.from_numpy(s).to(a.device), torch.from_numpy(v).to(a.device)


def layer_basis(name: str, gram: torch.Tensor, tau: float) -> LayerBasis:
    """Eigen-decompose each group's Gram (``(groups, d_in, d_in)`` float64) and build the basis."""
    groups = []
    eigs = []
    rank = null_dim = 0
    for a in gram:
        s, v = symmetric_eigh(0.5 * (a + a.T))
        mask, r = null_mask(s, tau)
        k = int(mask.sum())
        if k <= a.shape[0] - k:
            groups.append(GroupBasis(v[:, mask].contiguous(), complement=False))
        else:
            groups.append(GroupBasis(v[:, ~mask].contiguous(), complement=True))
        eigs.append(s)
        rank += r
        null_dim += k
    return LayerBasis(name, tuple(groups), torch.stack(eigs), rank, null_dim)
