"""The SVD fallback of layer_basis when LAPACK's eigh fails to converge."""

import torch

from teleport_cli import bases


def test_svd_fallback_gives_the_same_null_space_projection(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(5, 12, dtype=torch.float64)
    gram = (x.T @ x).unsqueeze(0)  # rank 5 of 12: a 7-dimensional null space
    ref = bases.layer_basis("l", gram, 1.0)

    def fail(a):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(bases.torch.linalg, "eigh", fail)
    alt = bases.layer_basis("l", gram, 1.0)
    assert (alt.rank, alt.null_dim) == (ref.rank, ref.null_dim) == (5, 7)
    d = torch.randn(1, 3, 12, dtype=torch.float64)
    assert torch.allclose(alt.project(d), ref.project(d), atol=1e-10)
    assert torch.allclose(alt.project(d) @ x.T, torch.zeros(1, 3, 5, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(alt.eigenvalues, ref.eigenvalues, atol=1e-10)
