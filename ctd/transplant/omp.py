"""Orthogonal Matching Pursuit over a fixed dictionary, batched, in pure torch (no I/O).

Each target y (a donor-space embedding of a new token) is approximated by k atoms of the
dictionary P (donor-space embeddings of shared tokens): greedily pick the atom most correlated
with the residual, re-solve least squares on the chosen atoms, repeat. The coefficients are then
applied to the same atoms in base space (`OmpResult.combine`).

Screening is the expensive part: one residuals x dictionary GEMM. It runs in the precision the
hardware does fastest (`ctd.numerics.fast_dtype`: bf16 where it has a fast path, e.g. AMX,
~5x fp32; fp32 elsewhere) only to *screen*: each target keeps its `pool` best atoms. Picks
are made in fp32 from inner products alone (Batch-OMP restricted to the pool): with
beta = <candidates, y> and G = <candidates, chosen atoms>, the correlations with the residual
y - A x are beta - G x, so no step between screenings touches the D-dimensional residual. A
rigorous bf16 error bound is too loose to certify the picks, so agreement with plain fp32 OMP
(`pool=0`) is measured instead (tests on random problems, the transplant benchmark).
- exact (`refresh=1`): screen at every step.
- fast (`refresh=r`): screen every r steps and pick from the pooled atoms in between: r times
  fewer GEMMs; the quality loss against exact is measured by the benchmark.
The least-squares solution is updated by growing the inverse Cholesky factor of the chosen atoms'
Gram matrix (broadcast products per step, no triangular solves); near-dependent atoms stop a
target's support.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ctd.numerics import fast_dtype

# An atom whose squared distance to the span of the chosen ones is below this fraction of its own
# squared norm is treated as dependent: the target stops growing its support instead of dividing
# by ~0 in the Cholesky update.
_DEPENDENT = 1e-5


@dataclass
class OmpResult:
    """Per target: the chosen atoms, their coefficients, and the relative residual in donor space."""

    indices: Tensor  # int64 [n, k]; slots after an early stop hold atom 0 with coefficient 0
    coefs: Tensor  # float32 [n, k]
    residual: Tensor  # float32 [n]: |y - sum coef * P[idx]| / |y| (0 for y = 0)
    stopped: int  # targets that stopped early on a near-dependent atom

    def combine(self, rows: Tensor, chunk: int = 8192) -> Tensor:
        """sum_j coefs[:, j] * rows[indices[:, j]]: the same combination in another space."""
        out = torch.empty(len(self.indices), rows.shape[1], dtype=torch.float32)
        for s in range(0, len(self.indices), chunk):
            idx, w = self.indices[s : s + chunk], self.coefs[s : s + chunk]
            out[s : s + chunk] = torch.einsum("nk,nkd->nd", w, rows[idx].float())
        return out


class _Cholesky:
    """Least squares on the chosen atoms, one system per target, grown by one atom per step.

    Keeps the inverse of the lower Cholesky factor of the chosen atoms' Gram matrix and
    z = L^-1 b (b = <chosen atoms, y>), so that adding an atom and reading the coefficients
    x = L^-T z are broadcast products: on [n, t, t] batches of tiny matrices these are several
    times faster than batched triangular solves or bmm on CPU.
    """

    def __init__(self, n: int, k: int, ridge: float = 0.0):
        self.ridge = ridge  # added to the Gram diagonal: (A^T A + ridge I) x = A^T y
        self.Li = torch.zeros(n, k, k)  # inverse of the lower Cholesky factor
        self.z = torch.zeros(n, k)
        self.alive = torch.ones(n, dtype=torch.bool)
        self.t = 0

    def add(self, g: Tensor, d: Tensor, b: Tensor) -> Tensor:
        """Append an atom with Gram column g [n, t] (against the chosen), squared norm d [n]
        and inner product b [n] with the target.

        Returns the mask of targets for which the atom was accepted; the others get a phantom
        unit atom with coefficient 0 (the caller zeroes its row) and stop for good.
        """
        t, Li = self.t, self.Li
        w = (Li[:, :t, :t] * g.unsqueeze(1)).sum(-1)  # L^-1 g: the new row of L
        dr = d + self.ridge
        s = dr - (w * w).sum(-1)  # squared distance of the atom to the span of the chosen
        ok = self.alive & (s > _DEPENDENT * dr) & (d > 0)
        self.alive &= ok
        w = torch.where(ok.unsqueeze(-1), w, 0.0)
        r = torch.where(ok, s.clamp_min(0).sqrt(), 1.0)  # the new diagonal entry of L
        Li[:, t, :t] = -(w.unsqueeze(-1) * Li[:, :t, :t]).sum(1) / r.unsqueeze(-1)
        Li[:, t, t] = 1.0 / r
        self.z[:, t] = torch.where(ok, b - (w * self.z[:, :t]).sum(-1), 0.0) / r
        self.t += 1
        return ok

    def coefficients(self) -> Tensor:
        """x = L^-T z: the least-squares coefficients of the t atoms chosen so far."""
        t = self.t
        return (self.Li[:, :t, :t] * self.z[:, :t].unsqueeze(-1)).sum(1)


def _batch(P: Tensor, Pb: Tensor, Y: Tensor, k: int, pool: int, refresh: int, ridge: float):
    """OMP for one batch of targets; see `omp` for `pool`, `refresh` and `ridge`."""
    if pool == 0:
        return _batch_plain(P, Y, k, ridge)
    n, D = Y.shape
    chol = _Cholesky(n, k, ridge)
    idx = torch.zeros(n, k, dtype=torch.long)
    YA = torch.zeros(n, k + 1, D)  # the target, then the chosen atoms (zero rows for phantoms)
    YA[:, 0] = Y
    x = torch.zeros(n, 0)
    G = torch.zeros(n, k, pool)  # <chosen atom, candidate>: a step writes one contiguous row
    rows = torch.arange(n)
    for t in range(k):
        if t % refresh == 0:  # screen: new candidates for the current residual, and their Grams
            R = Y - torch.einsum("nt,ntd->nd", x, YA[:, 1 : t + 1]) if t else Y
            cand = (R.to(Pb.dtype) @ Pb.T).abs_().topk(pool, dim=1).indices
            Pc = P.index_select(0, cand.flatten()).view(n, pool, D)
            H = torch.bmm(YA[:, : t + 1], Pc.transpose(1, 2))  # [n, 1 + t, pool]
            beta, G[:, :t] = H[:, 0], H[:, 1:]
            Gcc = torch.bmm(Pc, Pc.transpose(1, 2))
            # chosen atoms are (nearly, without ridge) orthogonal to R; never pick one twice
            used = (cand.unsqueeze(-1) == idx[:, None, :t]).any(-1)
        # correlations with the residual y - A x, from inner products only: beta - G x
        corr = (beta - (G[:, :t] * x.unsqueeze(-1)).sum(1)).abs_()
        m = corr.masked_fill_(used, -1.0).argmax(1)
        used[rows, m] = True
        j = cand[rows, m]
        ok = chol.add(G[rows, :t, m], Gcc[rows, m, m], beta[rows, m])
        idx[:, t] = torch.where(ok, j, 0)
        YA[:, t + 1] = torch.where(ok.unsqueeze(-1), P.index_select(0, j), 0.0)
        G[:, t] = torch.where(ok.unsqueeze(-1), Gcc[rows, m], 0.0)  # Gcc is symmetric
        x = chol.coefficients()
    return idx, x, chol


def _batch_plain(P: Tensor, Y: Tensor, k: int, ridge: float = 0.0):
    """The reference: plain fp32 correlations of the residual with the whole dictionary."""
    n, D = Y.shape
    chol = _Cholesky(n, k, ridge)
    idx = torch.zeros(n, k, dtype=torch.long)
    A = torch.zeros(n, k, D)
    x = torch.zeros(n, 0)
    R = Y
    for t in range(k):
        if t:
            R = Y - torch.einsum("nt,ntd->nd", x, A[:, :t])
        corr = (R @ P.T).abs_()
        if t:
            corr.scatter_(1, idx[:, :t], -1.0)
        j = corr.argmax(1)
        atom = P[j]
        ok = chol.add(torch.einsum("ntd,nd->nt", A[:, :t], atom), (atom * atom).sum(1),
                      (atom * Y).sum(1))
        idx[:, t] = torch.where(ok, j, 0)
        A[:, t] = torch.where(ok.unsqueeze(-1), atom, 0.0)
        x = chol.coefficients()
    return idx, x, chol


def omp(
    dictionary: Tensor,
    targets: Tensor,
    k: int,
    *,
    pool: int = 32,
    refresh: int = 1,
    batch_size: int = 192,
    ridge: float = 0.0,
    on_batch: Callable[[int], None] | None = None,
) -> OmpResult:
    """Approximate each row of `targets` [n, D] by k rows of `dictionary` [S, D].

    Every `refresh` steps the residuals are correlated with the whole dictionary in bf16 and
    each target keeps its `pool` best atoms; each step picks, in fp32, the best pooled atom for
    the current residual. `refresh=1` is exact OMP up to bf16 screening (`pool=0`: plain fp32,
    the reference); larger `refresh` is the fast mode. `ridge` > 0 solves ridge least squares
    with that fraction of the dictionary's mean squared atom norm on the Gram diagonal: it bounds
    the coefficients, which the transfer applies to *another* space where the chosen atoms need
    not be as collinear (unbounded coefficients there give rows of enormous norm). `on_batch(n)`
    reports progress.
    """
    P = dictionary.float().contiguous()  # built once for all batches
    Y = targets.float()
    S, n = len(P), len(Y)
    if not 0 < k <= S:
        raise ValueError(f"k={k} must be between 1 and the dictionary size {S}")
    pool = min(pool, S)
    Pb = P.to(fast_dtype()) if pool else P
    lam = ridge * float((P * P).sum(1).mean())
    indices = torch.zeros(n, k, dtype=torch.long)
    coefs = torch.zeros(n, k)
    stopped = 0
    for s in range(0, n, batch_size):
        Yb = Y[s : s + batch_size]
        idx, x, chol = _batch(P, Pb, Yb, k, pool, max(1, refresh), lam)
        indices[s : s + len(Yb)], coefs[s : s + len(Yb)] = idx, x
        stopped += int((~chol.alive).sum())
        if on_batch is not None:
            on_batch(len(Yb))
    result = OmpResult(indices, coefs, torch.zeros(n), stopped)
    approx = result.combine(P)
    norm = Y.norm(dim=1)
    result.residual = torch.where(norm > 0, (Y - approx).norm(dim=1) / norm.clamp_min(1e-30), 0.0)
    return result
