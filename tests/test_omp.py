"""OMP (ctd.transplant.omp) against brute-force least squares, ridge, dependent atoms, fast mode."""

from __future__ import annotations

import pytest
import torch

from ctd.transplant.omp import omp


def _brute_omp(P: torch.Tensor, y: torch.Tensor, k: int, lam: float = 0.0):
    """Textbook OMP in float64: full correlations, (ridge) least squares re-solved from scratch."""
    P, y, chosen = P.double(), y.double(), []
    r = y
    for _ in range(k):
        c = (P @ r).abs()
        c[chosen] = -1
        chosen.append(int(c.argmax()))
        A = P[chosen].T
        x = torch.linalg.solve(A.T @ A + lam * torch.eye(len(chosen), dtype=A.dtype), A.T @ y)
        r = y - A @ x
    return chosen, x


@pytest.mark.parametrize("ridge", [0.0, 0.05])
@pytest.mark.parametrize("pool", [0, 32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_omp_matches_brute_force_least_squares(pool, seed, ridge):
    g = torch.Generator().manual_seed(seed)
    P, Y, k = torch.randn(400, 32, generator=g), torch.randn(25, 32, generator=g), 10
    res = omp(P, Y, k, pool=pool, batch_size=8, ridge=ridge)
    lam = ridge * float((P * P).sum(1).mean())
    for i in range(len(Y)):
        chosen, x = _brute_omp(P, Y[i], k, lam)
        assert sorted(chosen) == sorted(res.indices[i].tolist())
        ref = dict(zip(chosen, x.tolist()))
        got = dict(zip(res.indices[i].tolist(), res.coefs[i].tolist()))
        assert max(abs(ref[j] - got[j]) for j in chosen) < 1e-5
    approx = torch.einsum("nk,nkd->nd", res.coefs, P[res.indices])
    expect = (Y - approx).norm(dim=1) / Y.norm(dim=1)
    assert torch.allclose(res.residual, expect, atol=1e-5)


def test_ridge_bounds_coefficients_of_near_collinear_atoms():
    """Plain OMP on nearly collinear atoms needs huge coefficients; the transfer would carry
    them to another space. Ridge least squares obeys |x| <= |y| / (2 sqrt(lambda))."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(8, 24, generator=g)
    P = torch.cat([base, base + 0.02 * torch.randn(8, 24, generator=g)])
    Y = torch.randn(16, 24, generator=g)
    plain = omp(P, Y, 16, pool=0)
    assert plain.stopped == 0 and plain.coefs.norm(dim=1).max() > 100
    ridged = omp(P, Y, 16, pool=0, ridge=0.01)
    lam = 0.01 * float((P * P).sum(1).mean())
    assert (ridged.coefs.norm(dim=1) <= Y.norm(dim=1) / (2 * lam**0.5) + 1e-4).all()
    assert (ridged.residual < 1).all()  # still a fit, only a more cautious one


def test_omp_guards_near_dependent_atoms():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 16, generator=g)
    P = torch.cat([base, base * 2, base[:1] + 1e-7])  # duplicates: only 3 independent atoms
    Y = base[:2].sum(0, keepdim=True)  # exactly in the span of 2 atoms
    res = omp(P, Y, 6, pool=4)
    assert torch.isfinite(res.coefs).all() and res.stopped == 1
    assert res.residual.item() < 1e-5


def test_fast_mode_runs_and_exact_is_at_least_as_good():
    """Isotropic random atoms are the fast mode's worst case; its quality on real embeddings is
    measured by scripts/bench_transplant.py."""
    g = torch.Generator().manual_seed(3)
    P, Y = torch.randn(2000, 48, generator=g), torch.randn(64, 48, generator=g)
    exact, fast = omp(P, Y, 16), omp(P, Y, 16, pool=64, refresh=8)
    assert torch.isfinite(fast.coefs).all() and len(set(fast.indices[0].tolist())) == 16
    assert exact.residual.mean() <= fast.residual.mean() < 1
