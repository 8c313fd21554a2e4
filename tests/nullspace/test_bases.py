"""Null-space bases against numpy's rank rule and brute-force projections."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from teleport_cli.nullspace.bases import layer_basis, null_mask


def _rows(n, d, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), d=st.integers(1, 24), seed=st.integers(0, 10_000))
def test_tau1_rank_matches_numpy_matrix_rank(n, d, seed):
    x = _rows(n, d, min(n, d), seed)
    gram = x.T @ x
    s, _ = torch.linalg.eigh(gram)
    mask, rank = null_mask(s, 1.0)
    assert rank == np.linalg.matrix_rank(gram.numpy(), hermitian=True)
    assert int(mask.sum()) == d - rank


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 20), tau=st.floats(0.5, 0.9999), seed=st.integers(0, 10_000))
def test_tau_budget_rule_is_the_largest_prefix_within_budget(d, tau, seed):
    x = _rows(3 * d, d, d, seed)
    s, _ = torch.linalg.eigh(x.T @ x)
    mask, _ = null_mask(s, tau)
    k = int(mask.sum())
    budget = (1 - tau) * s.sum().item()
    # brute force: the largest k such that the k smallest eigenvalues sum to at most the budget
    expected = max(j for j in range(d + 1) if s[:j].sum().item() <= budget)
    assert k == expected
    assert mask[:k].all() and not mask[k:].any()


def test_projector_is_idempotent_orthogonal_to_inputs_and_complete():
    x = _rows(7, 12, 5, 1)  # rank 5: null dimension 7
    basis = layer_basis("l", (x.T @ x)[None], 1.0)
    assert basis.rank == 5 and basis.null_dim == 7
    g = torch.randn(1, 4, 12, dtype=torch.float64)
    p = basis.project(g)
    assert torch.allclose(basis.project(p), p, atol=1e-12)  # idempotent
    assert (p[0] @ x.T).abs().max() < 1e-10  # D X^T = 0: outputs on the inputs unchanged
    # the remainder lies in the row space of X: it is orthogonal to the null space
    r = (g - p)[0]
    q, _ = torch.linalg.qr(x.T)
    assert torch.allclose(r @ q @ q.T, r, atol=1e-10)


def test_both_basis_storage_modes_project_identically():
    x = _rows(3, 10, 3, 2)  # null dim 7 > d/2: stored as the kept basis (complement)
    y = _rows(9, 10, 9, 3)  # null dim 1: stored as the null basis
    for rows in (x, y):
        basis = layer_basis("l", (rows.T @ rows)[None], 1.0)
        s, v = torch.linalg.eigh(rows.T @ rows)
        mask, _ = null_mask(s, 1.0)
        n = v[:, mask]
        g = torch.randn(5, 10, dtype=torch.float64)
        assert torch.allclose(basis.project(g[None])[0], g @ n @ n.T, atol=1e-12)


def test_eigh_fallback_agrees_with_the_direct_decomposition(monkeypatch):
    """When LAPACK's eigh fails to converge, the scaled retry gives the same spectrum."""
    from teleport_cli.nullspace import bases

    x = _rows(40, 30, 12, 7)
    a = x.T @ x
    s_ref, _ = torch.linalg.eigh(a)
    real = torch.linalg.eigh
    calls = []

    def flaky(m):
        calls.append(1)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    s, v = bases.symmetric_eigh(a)
    assert len(calls) == 2
    assert torch.allclose(s, s_ref, rtol=1e-10, atol=1e-9)
    assert torch.allclose(v @ torch.diag(s) @ v.T, a, atol=1e-8)
