"""Null-space bases of Gram matrices, and projection onto them (pure linear algebra).

A perturbation D of a layer's weight (``d_out x d_in``) leaves the layer's outputs on the
calibration set unchanged when ``D X^T = 0``, i.e. when every row of D lies in the null space
of the Gram ``A = X^T X`` (arXiv:2502.11362, Eq. 6-8; Saha et al., ICLR 2021, for the basis).
With ``A = V diag(s) V^T`` (s ascending):

* ``tau = 1``: null directions are the numerically zero eigenvalues,
  ``s_i <= d_in * eps_float64 * max(s)`` (the rule of ``numpy.linalg.matrix_rank``);
* ``tau < 1``: additionally the smallest directions whose eigenvalues sum to at most
  ``(1 - tau) * trace(A)``; the method is then approximately invariant.

With ``--eigh float32`` (``TeleportConfig.eigh``; the default is float64) and tau < 1 the
pipeline decomposes in float32 (``precision=torch.float32``): a float32 eigh of the same Gram is
1.7-2.3x faster, and its error (``~ d_in * eps_float32 * max(s)`` per
eigenvalue, Davis-Kahan for the subspace) is far below the ``(1 - tau) * trace`` budget that
picks the null directions (tests/nullspace/test_precision.py checks dimension, projector and
energy against float64). Its vectors are re-orthonormalised in float64, and any group whose
float32 eigh fails falls back to float64. The reported rank then follows the same rule with
float32's epsilon (as ``numpy.linalg.matrix_rank`` does for float32 input): directions below
float32's resolution count as zero. It is not the default because float32 bases follow the
Grams' float-order noise (another batch size, another number of ranks) about 50x more than
float64 ones (docs/cost.md).

The projection of a gradient G (``d_out x d_in``) is ``G N N^T`` with the null basis N, or
``G - G M M^T`` with the kept basis M; whichever basis is smaller is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS64 = torch.finfo(torch.float64).eps
# float32 eigh retry: a diagonal shift of this share of max(diag) (removed from the eigenvalues
# afterwards) lets LAPACK converge on Grams with large clusters of eigenvalues below float32's
# resolution (seen on test_resnet's 1728 x 1728 Grams)
SHIFT32 = 1e-7


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


def null_mask(eigenvalues: torch.Tensor, tau: float, eps: float = EPS64) -> tuple[torch.Tensor, int]:
    """Which eigen-directions count as null at ``tau``, and the numerical rank.

    Args:
        eigenvalues: ``(d_in,)`` float64, ascending (from ``torch.linalg.eigh``).
        tau: fraction of the trace to keep, in (0, 1].
        eps: machine epsilon of the eigh that gave ``eigenvalues``; only the reported rank
            uses it (``s_i > d_in * eps * max(s)``), the mask always takes float64's.

    Returns:
        (mask, rank): boolean ``(d_in,)`` mask of null directions; rank of the Gram.
    """
    s = eigenvalues.clamp_min(0.0)
    d = s.numel()
    top = s.max() if d else torch.tensor(0.0, dtype=s.dtype)
    zero = s <= d * EPS64 * top
    rank = int((~zero).sum()) if eps == EPS64 else int((s > d * eps * top).sum())
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


def _orthonormalise(v: torch.Tensor) -> torch.Tensor:
    """One Newton-Schulz step ``V (3 I - V^T V) / 2`` in float64: float32 eigenvectors are
    orthonormal to ~1e-6, after it to ~1e-12 (the error squares)."""
    v = v.to(torch.float64)
    return 0.5 * v @ (3.0 * torch.eye(v.shape[-1], dtype=v.dtype, device=v.device) - v.mT @ v)


def eigh32(gram: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eigen-decompose ``(groups, d, d)`` float64 Grams in float32, batched over the groups.

    Each group's diagonal is shifted by ``SHIFT32 * max(diag)`` before the float32 eigh and the
    shift is removed from its eigenvalues (the eigenvectors of ``A + c I`` are those of A): the
    shift is below float32's own roundoff of A's large eigenvalues, yet without it LAPACK failed
    to converge on test_resnet's 864 and 1728 wide Grams (and the failed try cost as much as
    the float32 eigh). If the batch still fails, each group is retried alone, then in float64
    (:func:`symmetric_eigh`). Returns per group ``(eigenvalues float64 (d,), vectors (d, d))``;
    vectors are float32, or float64 for a group that fell back.
    """
    a32 = gram.to(torch.float32)
    a32 = 0.5 * (a32 + a32.mT)
    shift = SHIFT32 * a32.diagonal(dim1=-2, dim2=-1).max(dim=-1).values.clamp_min(0.0)  # (groups,)
    eye = torch.eye(a32.shape[-1], dtype=a32.dtype, device=a32.device)
    shifted = a32 + shift[:, None, None] * eye
    try:
        s, v = torch.linalg.eigh(shifted)
        return [(s[i].to(torch.float64) - float(shift[i]), v[i]) for i in range(s.shape[0])]
    except torch.linalg.LinAlgError:
        pass
    out = []
    for a, c, a64 in zip(shifted, shift, gram):
        try:
            s, v = torch.linalg.eigh(a)
            out.append((s.to(torch.float64) - float(c), v))
        except torch.linalg.LinAlgError:
            out.append(symmetric_eigh(0.5 * (a64 + a64.T)))
    return out


def layer_basis(name: str, gram: torch.Tensor, tau: float, precision: torch.dtype = torch.float64) -> LayerBasis:
    """Eigen-decompose each group's Gram (``(groups, d_in, d_in)`` float64) and build the basis.

    ``precision`` float32 (only where ``tau < 1``; at tau = 1 float64 is always used, since the
    rank rule needs it) takes :func:`eigh32`; the basis vectors are float64 either way.
    """
    fast = precision == torch.float32 and tau < 1.0
    pairs = eigh32(gram) if fast else [symmetric_eigh(0.5 * (a + a.T)) for a in gram]
    eps = torch.finfo(torch.float32).eps if fast else EPS64
    groups = []
    eigs = []
    rank = null_dim = 0
    for a, (s, v) in zip(gram, pairs):
        mask, r = null_mask(s, tau, eps if v.dtype == torch.float32 else EPS64)
        k = int(mask.sum())
        chosen = v[:, mask] if k <= a.shape[0] - k else v[:, ~mask]
        if v.dtype != torch.float64:
            chosen = _orthonormalise(chosen)
        groups.append(GroupBasis(chosen.contiguous(), complement=k > a.shape[0] - k))
        eigs.append(s)
        rank += r
        null_dim += k
    return LayerBasis(name, tuple(groups), torch.stack(eigs), rank, null_dim)
