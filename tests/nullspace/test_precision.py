"""float32 eigh (tau < 1) of float64 and of float32-product Grams against the float64 path.

The reference is the float64 path on the same calibration batches: float64 products, float64
eigh. Where tau < 1 the null directions are the smallest eigen-directions within
``(1 - tau) * trace``; what must hold for the float32 basis N32 (tolerances from perturbation
theory, with ``E`` the float32 path's error as a perturbation of the exact Gram A):

* the same null dimension (the tau rule's cut does not move: on these Grams the eigengap at the
  cut is far larger than ``||E||``);
* Davis-Kahan: ``||P32 - P64||_2 <= err / gap`` with ``gap`` the float64 eigengap at the cut and
  ``err = ||A32 - A64||_2 + 4 d eps32 ||A||_2`` (the measured Gram error plus a generous
  backward error of a float32 symmetric eigensolver, Golub and Van Loan Sec. 8.3, and the
  shift of ``SHIFT32 * max(diag)``);
* the energy the float32 null space lets through, ``trace(N32^T A64 N32)``, exceeds the float64
  minimum (the sum of the k smallest eigenvalues, Ky Fan) by at most ``k * err``: the basis is a
  valid tau null space of the exact Gram;
* orthonormal columns to 1e-10 (float64 re-orthonormalisation).
"""

import itertools
from pathlib import Path

import pytest
import torch

from teleport_cli.checkpoints.containers import read_checkpoint
from teleport_cli.checkpoints.options import FileOptions
from teleport_cli.data.inputs import load_data_inputs
from teleport_cli.data.tensors import as_tensor_data
from teleport_cli.models.loading import load_weights
from teleport_cli.nullspace import bases as bases_mod
from teleport_cli.nullspace.bases import SHIFT32, layer_basis
from teleport_cli.nullspace.capture import capture_grams
from teleport_cli.nullspace.selection import find_layers

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
EPS32 = torch.finfo(torch.float32).eps
TAU = 0.99


def _projector(gb) -> torch.Tensor:
    v = gb.vectors
    p = v @ v.T
    return torch.eye(v.shape[0], dtype=torch.float64) - p if gb.complement else p


def _sin_theta(a, b) -> float:
    """``||P_a - P_b||_2`` for two null spaces of equal dimension stored the same way: the sine of
    the largest principal angle, from the stored (smaller) bases: ``||V_a - V_b V_b^T V_a||_2``."""
    assert a.complement == b.complement
    r = a.vectors - b.vectors @ (b.vectors.T @ a.vectors)
    return float(torch.linalg.svdvals(r)[0]) if r.numel() else 0.0


def _null_energy(gb, a) -> float:
    """``trace(N^T A N)`` of the null space of ``gb``."""
    v = gb.vectors
    inside = float(torch.einsum("ij,ik,kj->", v, a, v))
    return float(torch.trace(a)) - inside if gb.complement else inside


@pytest.fixture(scope="module")
def resnet_grams():
    """float64 and float32-product Grams of the shipped test_resnet on 64 calibration images."""
    ck = read_checkpoint(SAMPLES / "fmnist_test_resnet_mid.safetensors")
    model = load_weights(ck, FileOptions())[0].model.eval()
    inputs = load_data_inputs(ck.metadata, "fmnist_test_resnet_mid", SAMPLES / "fmnist_calibration", None, model, samples=64, seed=0)
    batches = as_tensor_data(inputs.calibration.data, "calibration").batches(32, torch.device("cpu"))
    layers, _ = find_layers(model)
    a64 = capture_grams(model, layers, batches)
    a32 = capture_grams(model, layers, batches, product_dtype=torch.float32)
    return [(s.name, a64[s.name].gram, a32[s.name].gram) for s, _ in layers if a64[s.name].gram is not None]


def test_float32_path_spans_the_float64_null_space_on_test_resnet_grams(resnet_grams):
    checked = bounded = 0
    for (name, g64, g32), products in itertools.product(resnet_grams, ("float64", "float32")):
        ref = layer_basis(name, g64, TAU)  # float64 products, float64 eigh
        if products == "float64":  # the pipeline's default: float32 eigh of the float64 Gram
            g32 = g64
        fast = layer_basis(name, g32, TAU, torch.float32)
        assert fast.null_dim == ref.null_dim, name
        for a, a32, s, gb64, gb32 in zip(g64, g32, ref.eigenvalues, ref.groups, fast.groups):
            d = a.shape[0]
            k = gb64.vectors.shape[1] if not gb64.complement else d - gb64.vectors.shape[1]
            norm = float(s[-1])
            # ||E||_F bounds ||E||_2 from above, so the bounds below only get looser
            err = float((a32 - a).norm()) + 4 * d * EPS32 * norm + SHIFT32 * float(a.diagonal().max())
            v = gb32.vectors
            assert float((v.T @ v - torch.eye(v.shape[1], dtype=torch.float64)).abs().max()) < 1e-10, name
            if 0 < k < d:
                gap = float(s[k] - s[k - 1])
                assert _sin_theta(gb32, gb64) <= err / gap + 1e-9, (name, err / gap)
                bounded += err / gap < 1
            energy = _null_energy(gb32, a)
            assert energy <= float(s[:k].clamp_min(0).sum()) + k * err + 1e-12 * norm, name
            assert energy <= (1 - TAU) * float(s.clamp_min(0).sum()) + k * err, name
            checked += 1
    assert checked >= 20 and bounded >= 10  # most layers give a non-vacuous Davis-Kahan bound


def test_tau1_keeps_float64_exactly(resnet_grams):
    name, g64, _ = resnet_grams[-1]
    ref = layer_basis(name, g64, 1.0)
    fast = layer_basis(name, g64, 1.0, torch.float32)
    assert (fast.rank, fast.null_dim) == (ref.rank, ref.null_dim)
    assert torch.equal(fast.eigenvalues, ref.eigenvalues)
    assert all(torch.equal(a.vectors, b.vectors) for a, b in zip(fast.groups, ref.groups))


def _grouped_gram(groups=6, d=9, rows=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, rows, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
    return x.transpose(1, 2) @ x


def test_batched_groups_match_per_group_float64():
    gram = _grouped_gram()
    fast = layer_basis("dw", gram, TAU, torch.float32)
    ref = layer_basis("dw", gram, TAU)
    assert fast.null_dim == ref.null_dim
    # eigenvalues: float32 eigh has absolute error ~ d eps32 ||A|| per eigenvalue
    tol = 4 * 9 * EPS32 * float(gram.diagonal(dim1=1, dim2=2).sum(1).max())
    assert float((fast.eigenvalues - ref.eigenvalues).abs().max()) <= tol
    for a, b in zip(fast.groups, ref.groups):
        assert float((_projector(a) - _projector(b)).abs().max()) < 1e-3


def test_a_group_whose_float32_eigh_fails_falls_back_to_float64(monkeypatch):
    gram = _grouped_gram(groups=3)
    real = torch.linalg.eigh
    calls = []

    def flaky(a, *args, **kw):  # float32 LAPACK fails on group 1 (and on any batch holding it)
        calls.append(a.dtype)
        if a.dtype == torch.float32 and (a.dim() == 3 or torch.equal(a, flaky.bad)):
            raise torch.linalg.LinAlgError("failed to converge")
        return real(a, *args, **kw)

    a32 = gram.to(torch.float32)
    a32 = 0.5 * (a32 + a32.mT)
    flaky.bad = a32[1] + SHIFT32 * a32[1].diagonal().max() * torch.eye(9)
    monkeypatch.setattr(bases_mod.torch.linalg, "eigh", flaky)
    pairs = bases_mod.eigh32(gram)
    assert [v.dtype for _, v in pairs] == [torch.float32, torch.float64, torch.float32]
    s64, v64 = real(0.5 * (gram[1] + gram[1].T))
    assert torch.equal(pairs[1][0], s64) and torch.equal(pairs[1][1], v64)
    assert torch.float64 in calls


def test_the_default_eigh_is_float64_and_float32_is_opt_in(monkeypatch):
    """The pipeline asks layer_basis for float64 unless --eigh float32 (and tau < 1): float32 bases
    follow the Grams' float-order noise (docs/cost.md)."""
    import teleport_cli.pipeline as pipeline
    from teleport_cli.config import TeleportConfig
    from teleport_cli.models.builtin import MLP
    from teleport_cli.nullspace.bases import layer_basis as real

    seen = []

    def spy(name, gram, tau, precision=torch.float64):
        seen.append(precision)
        return real(name, gram, tau, precision)

    monkeypatch.setattr(pipeline, "layer_basis", spy)
    torch.manual_seed(0)
    model = MLP(in_features=8, hidden=[16], num_classes=3)
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    for eigh, tau, want in (("float64", 0.99, torch.float64), ("float32", 0.99, torch.float32), ("float32", 1.0, torch.float64)):
        seen.clear()
        pipeline.teleport(model, (x, y), TeleportConfig(steps=1, eigh=eigh, tau=tau, batch_size=64, guard_fraction=0.0))
        assert seen and set(seen) == {want}, (eigh, tau, seen)
