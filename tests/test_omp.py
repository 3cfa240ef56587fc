"""OMP (ctd.transplant.omp): brute-force least squares, ridge, dependent atoms, the screening
error bound, exact mode against plain fp32 OMP in both screening precisions, fast mode."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctd.numerics import fast_dtype
from ctd.transplant.omp import _BLOCK, _Screen, omp


@pytest.fixture(params=["bfloat16", "float32"])
def screening(request, monkeypatch):
    """Both numerics paths: bf16 screening (AMX-class CPUs) and fp32 (AVX2-only CPUs)."""
    monkeypatch.setenv("CTD_FAST_DTYPE", request.param)
    fast_dtype.cache_clear()
    yield getattr(torch, request.param)
    fast_dtype.cache_clear()


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


def _residual(P: torch.Tensor, y: torch.Tensor, support: list[int], lam: float):
    """float64 residual of ridge least squares on `support`."""
    P, y = P.double(), y.double()
    if not support:
        return y
    A = P[support].T
    return y - A @ torch.linalg.solve(A.T @ A + lam * torch.eye(len(support), dtype=A.dtype),
                                      A.T @ y)


def _assert_same_picks(P, Y, ref, got, lam: float, tol: float = 1e-6) -> int:
    """Exact mode picks what fp32 OMP picks; where a row first differs, the two atoms must be a
    near-tie that fp32 itself cannot resolve: correlations within `tol` |r| |p| (fp32's own
    rounding is D 2^-24 |r| |p| at worst). Returns the number of such rows."""
    ties = 0
    for i in (ref.indices != got.indices).any(1).nonzero().flatten().tolist():
        t = int((ref.indices[i] != got.indices[i]).nonzero()[0])
        r = _residual(P, Y[i], ref.indices[i, :t].tolist(), lam)
        a, b = P[ref.indices[i, t]].double(), P[got.indices[i, t]].double()
        gap = abs(abs(a @ r) - abs(b @ r))
        assert gap <= tol * r.norm() * max(a.norm(), b.norm()), (i, t, float(gap))
        ties += 1
    return ties


@pytest.mark.parametrize("ridge", [0.0, 0.05])
@pytest.mark.parametrize("pool", [0, 8])
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
    expect = (Y - res.combine(P, chunk=7)).norm(dim=1) / Y.norm(dim=1)
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


@pytest.mark.parametrize("refresh", [1, 8])
def test_omp_guards_near_dependent_atoms(refresh):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 16, generator=g)
    P = torch.cat([base, base * 2, base[:1] + 1e-7])  # duplicates: only 3 independent atoms
    Y = base[:2].sum(0, keepdim=True)  # exactly in the span of 2 atoms
    res = omp(P, Y, 6, pool=4, refresh=refresh)
    assert torch.isfinite(res.coefs).all() and res.stopped == 1
    assert res.residual.item() < 1e-5


def _dictionary(kind: str, S: int, D: int, g: torch.Generator) -> torch.Tensor:
    """Random dictionaries with the structures real donor embeddings have."""
    P = torch.randn(S, D, generator=g)
    if kind == "anisotropic":  # a shared mean direction and uneven norms, as in embeddings
        P = P + 3 * torch.randn(D, generator=g)
        P = P * torch.exp(torch.randn(S, 1, generator=g))
    elif kind == "clusters":  # near-duplicates: many atoms within bf16's resolution of each other
        P = P[torch.randint(0, max(2, S // 40), (S,), generator=g)]
        P = P + 1e-4 * torch.randn(S, D, generator=g)
    elif kind == "duplicates":  # exact copies tie exactly: both pick the lowest index
        P = P[torch.randint(0, max(2, S // 3), (S,), generator=g)]
    return P


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), S=st.integers(64, 2500), D=st.integers(4, 48),
       k=st.integers(1, 20), ridge=st.sampled_from([0.0, 0.01, 0.2]),
       kind=st.sampled_from(["gaussian", "anisotropic", "clusters", "duplicates"]))
def test_exact_mode_picks_what_fp32_omp_picks(screening, seed, S, D, k, ridge, kind):
    g = torch.Generator().manual_seed(seed)
    P = _dictionary(kind, S, D, g)
    Y = torch.randn(12, D, generator=g) * P.norm(dim=1).mean() / D**0.5
    Y[0] = P[0] + P[1]  # a target two atoms fit exactly
    ref = omp(P, Y, min(k, S), pool=0, ridge=ridge)
    got = omp(P, Y, min(k, S), pool=8, ridge=ridge, batch_size=5)
    lam = ridge * float((P * P).sum(1).mean())
    _assert_same_picks(P, Y, ref, got, lam)
    same = (ref.indices == got.indices).all(1)
    assert torch.allclose(ref.coefs[same], got.coefs[same], atol=1e-5, rtol=1e-4)
    assert ref.stopped == got.stopped or not same.all()


def test_exact_mode_rescreens_what_it_cannot_certify(screening):
    """A target equidistant from many exact copies: the screen cannot certify a pick among
    them, so it is screened in fp32; the pick is still the lowest index, as argmax."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(300, 40, generator=g)
    P = torch.cat([base, base[:1].repeat(700, 1), base[1:]])  # 701 copies of atom 0
    Y = base[:1] + 0.01 * torch.randn(3, 40, generator=g)
    ref, got = omp(P, Y, 4, pool=0), omp(P, Y, 4, pool=8)
    assert got.fallbacks > 0
    assert torch.equal(ref.indices, got.indices)
    assert (got.indices[:, 0] == 0).all()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), S=st.integers(1, 700), D=st.integers(1, 700),
       scale=st.floats(-20, 20), spread=st.floats(0, 2))
def test_screen_bounds_every_correlation(screening, seed, S, D, scale, spread):
    """The certificate's premise: each block's bound is >= |<r, p_j>| (float64) for all its
    atoms, at any scale and with atoms and coordinates of very different magnitudes."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(S, D, generator=g) * torch.exp(spread * torch.randn(S, 1, generator=g))
    P = P * torch.exp(spread * torch.randn(1, D, generator=g))
    R = torch.randn(9, D, generator=g) * 2.0**scale
    screen = _Screen(P, screening)
    _, bound, _ = screen.bounds(R, screen.buffer(len(R)))
    exact = torch.zeros(len(R), len(screen.atom), dtype=torch.float64)
    real = screen.atom >= 0
    exact[:, real] = (R.double() @ P.double().T)[:, screen.atom[real]].abs()
    worst = exact.view(len(R), -1, _BLOCK).amax(-1)
    assert (bound.double() >= worst).all()
    if screening == torch.float32:  # fp32 is left with the accumulation term only
        assert (bound.double() <= worst + 1e-3 * R.norm(dim=1, keepdim=True).double()
                * P.norm(dim=1).max().double()).all()


@pytest.mark.parametrize("kind", ["gaussian", "anisotropic"])
def test_fast_pool_is_the_best_screened_atoms(screening, kind):
    g = torch.Generator().manual_seed(7)
    P, R = _dictionary(kind, 3000, 48, g), torch.randn(16, 48, generator=g)
    screen = _Screen(P, screening)
    got = screen.top(R, screen.buffer(len(R)), 64)
    F, _, _ = screen.screen(R, screen.buffer(len(R)))
    f = torch.zeros(len(R), len(P))
    real = screen.atom >= 0
    f[:, screen.atom[real]] = F[:, real].float()  # |f| by atom
    want = f.topk(64, dim=1).indices
    for i in range(len(R)):  # the same set up to ties at the 64th value
        kth = f[i, want[i]].min()
        assert set(got[i].tolist()) ^ set(want[i].tolist()) <= set(
            (f[i] == kth).nonzero().flatten().tolist())


def test_fast_mode_runs_and_exact_is_at_least_as_good():
    """Isotropic random atoms are the fast mode's worst case; its quality on real embeddings is
    measured by scripts/bench_transplant.py."""
    g = torch.Generator().manual_seed(3)
    P, Y = torch.randn(2000, 48, generator=g), torch.randn(64, 48, generator=g)
    exact, fast = omp(P, Y, 16), omp(P, Y, 16, pool=64, refresh=8)
    assert torch.isfinite(fast.coefs).all() and len(set(fast.indices[0].tolist())) == 16
    assert exact.residual.mean() <= fast.residual.mean() < 1


def test_zero_targets_and_full_support(screening):
    g = torch.Generator().manual_seed(8)
    P = torch.randn(70, 6, generator=g)
    Y = torch.cat([torch.zeros(1, 6), torch.randn(2, 6, generator=g)])
    ref, got = omp(P, Y, 6, pool=0), omp(P, Y, 6)
    assert torch.equal(ref.indices, got.indices) and got.residual[0] == 0
    assert (got.residual[1:] < 1e-5).all()  # 6 independent atoms span R^6


def test_batches_on_workers_pick_as_one_thread():
    """Several torch threads run batches side by side, single-threaded each: same picks as one
    thread, and the thread count is restored."""
    g = torch.Generator().manual_seed(9)
    P, Y = torch.randn(1500, 24, generator=g), torch.randn(40, 24, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [omp(P, Y, 12, batch_size=8), omp(P, Y, 12, pool=64, refresh=4, batch_size=8)]
        torch.set_num_threads(3)
        three = [omp(P, Y, 12, batch_size=8), omp(P, Y, 12, pool=64, refresh=4, batch_size=8)]
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, three):
        assert torch.equal(a.indices, b.indices) and torch.allclose(a.coefs, b.coefs)
