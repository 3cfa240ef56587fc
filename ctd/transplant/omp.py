"""Orthogonal Matching Pursuit over a fixed dictionary, batched, in pure torch (no I/O).

Each target y (a donor-space embedding of a new token) is approximated by k atoms of the
dictionary P (donor-space embeddings of shared tokens): greedily pick the atom most correlated
with the residual r = y - A x (atoms are not normalised: argmax_j |<r, p_j>|), re-solve (ridge)
least squares on the chosen atoms, repeat. The coefficients are then applied to the same atoms in
base space (`OmpResult.combine`). `pool=0` is the reference: plain fp32 correlations with the
whole dictionary at every step.

Screening, a residuals x dictionary GEMM, is most of the cost. It runs in the precision the CPU
does fastest (`ctd.numerics.fast_dtype`: bf16 where it has a fast path such as AMX, ~6x fp32;
fp32 elsewhere), into a reused buffer, keeping only each block's largest |f| (blocks of `_BLOCK`
atoms, sorted by norm) while the GEMM's output is still in cache.

Exact mode (`refresh=1`) screens at every step and *certifies* each pick, so that it picks what
the fp32 reference picks:
- Error bound. With r~, p~ the screening-precision roundings of r and p_j and f_j the screened
  value, |<r, p_j>| <= |f_j| / (1 - u) + (||r - r~|| + g ||r~||) ||p~_j|| + ||r|| ||p_j - p~_j||
  (u: the GEMM's rounding of its fp32 sums to bf16, to nearest; g = D 2^-23 bounds fp32
  accumulation in any order). Both rounding errors are known exactly, the dictionary's once and
  the residual's at each step, so on the benchmark embeddings the bound is ~0.35% of
  ||r|| ||p_j|| rather than the ~1.2% the format's precision alone allows. In fp32 only the
  accumulation term is left.
- A block's bound uses its largest norms (atoms sorted by norm make them fit every atom). The
  best `_PASSES[0]` blocks by bound are inspected; their `pool` atoms with the largest |f| get
  fp32 correlations, and the best of those not chosen yet is the pick if it beats, by more than
  its own fp32 error, the bound of every atom not evaluated (the next block's, and the next atom's
  in the inspected blocks). Rows not certified (1-2% of steps on real embeddings: many atoms
  within the bound of the best) inspect more blocks and atoms; rows that still fail (near-ties
  within bf16's resolution, e.g. clusters of near-identical embeddings) are screened in fp32
  against the whole dictionary, as the reference does.
So exact picks differ from fp32 OMP's only where two correlations differ by less than fp32's own
rounding (~1e-7 |r| |p|), which the reference cannot resolve either.

Why not fewer screenings: a certificate that lasts beyond one step must bound how the residual's
change moves the atoms outside a pool. By Cauchy-Schwarz that is ||delta r|| ||p_j||, and one
step's ||delta r|| ||p|| is 1.1-1.4x the best correlation itself on both benchmark pairs: no step
certified for pools up to 8192 atoms. Low-rank bounds fail as well: the donor embeddings'
spectrum is flat (the top 128 of 640 singular directions hold 57% of the energy), and past the
first step a K-dimensional screen's bound reaches the best correlation for all atoms (K <= 256).

Fast mode (`refresh=r`): screen every r steps and keep each target's `pool` best screened atoms;
in between, picks come from the pool in fp32 using inner products alone (Batch-OMP): with
beta = <candidates, y> and G = <candidates, chosen atoms>, the correlations with y - A x are
beta - G x. r times fewer screenings; the quality loss against exact is measured by the benchmark.

The least-squares solution is updated by growing the inverse Cholesky factor of the chosen atoms'
Gram matrix (batched matrix-vector products per step, no triangular solves); near-dependent atoms
stop a target's support.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from ctd.numerics import fast_dtype

# An atom whose squared distance to the span of the chosen ones is below this fraction of its own
# squared norm is treated as dependent: the target stops growing its support instead of dividing
# by ~0 in the Cholesky update.
_DEPENDENT = 1e-5
_BLOCK = 64  # atoms per block: the screen keeps only each block's largest |correlation|
_CHUNK = 4096  # atoms per screening GEMM: large for the GEMM, small for the cache
# An exact step's passes: (blocks inspected, times `pool` atoms given fp32 correlations); each
# pass takes the rows the previous one did not certify.
_PASSES = ((8, 1), (64, 8), (256, 64))
_INF = float("inf")
_MIN_BATCH = 64  # targets per batch at least, when splitting batches for more workers


@dataclass
class OmpResult:
    """Per target: the chosen atoms, their coefficients, and the relative residual in donor space."""

    indices: Tensor  # int64 [n, k]; slots after an early stop hold atom 0 with coefficient 0
    coefs: Tensor  # float32 [n, k]
    residual: Tensor  # float32 [n]: |y - sum coef * P[idx]| / |y| (0 for y = 0)
    stopped: int  # targets that stopped early on a near-dependent atom
    fallbacks: int = 0  # exact steps the screen did not certify, screened in fp32 instead

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
    x = L^-T z are batched matrix-vector products: no triangular solves, which are several
    times slower on [n, t, t] batches of tiny matrices on CPU.
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
        # L^-1 g, the new row of L (row-vector products: MKL's faster batched kernel)
        w = torch.bmm(g.unsqueeze(1), Li[:, :t, :t].transpose(1, 2)).squeeze(1)
        dr = d + self.ridge
        s = dr - (w * w).sum(-1)  # squared distance of the atom to the span of the chosen
        ok = self.alive & (s > _DEPENDENT * dr) & (d > 0)
        self.alive &= ok
        w = torch.where(ok.unsqueeze(-1), w, 0.0)
        r = torch.where(ok, s.clamp_min(0).sqrt(), 1.0)  # the new diagonal entry of L
        Li[:, t, :t] = -torch.bmm(w.unsqueeze(1), Li[:, :t, :t]).squeeze(1) / r.unsqueeze(-1)
        Li[:, t, t] = 1.0 / r
        self.z[:, t] = torch.where(ok, b - (w * self.z[:, :t]).sum(-1), 0.0) / r
        self.t += 1
        return ok

    def coefficients(self) -> Tensor:
        """x = L^-T z: the least-squares coefficients of the t atoms chosen so far."""
        t = self.t
        return torch.bmm(self.z[:, None, :t], self.Li[:, :t, :t]).squeeze(1)


class _Screen:
    """The dictionary in the screening precision, sorted by norm and padded to whole blocks,
    with each block's terms of the screening error bound (see the module docstring)."""

    def __init__(self, P: Tensor, dtype: torch.dtype):
        S, D = P.shape
        self.P, self.dtype = P, dtype
        self.p_norm = P.norm(dim=1)
        order = self.p_norm.argsort(descending=True)
        pad = -S % _BLOCK  # zero atoms, never candidates
        sorted_ = torch.cat([P[order], P.new_zeros(pad, D)])
        low = sorted_.to(dtype)
        self.lowT = low.T.contiguous()  # [D, S']: the layout the GEMM runs fastest with
        lowf = low.float()
        # per block, the largest ||p~_j|| and ||p_j - p~_j|| (0 in fp32) of its atoms [2, S'/_BLOCK]
        self.block_terms = torch.stack([lowf.norm(dim=1), (sorted_ - lowf).norm(dim=1)]
                                       ).view(2, -1, _BLOCK).amax(-1)
        self.atom = torch.cat([order, order.new_full((pad,), -1)])  # sorted position -> atom
        # |f| in place through the sign bit of f's integer view; integer maxima order like |f|
        self.bits, self.magnitude = ((torch.int16, 0x7FFF) if dtype.itemsize == 2
                                     else (torch.int32, 0x7FFFFFFF))
        # the GEMM rounds its fp32 sums to the output dtype, to nearest (none in fp32)
        self.u = torch.finfo(dtype).eps / 2 if dtype != torch.float32 else 0.0
        self.g = D * 2.0**-23

    def buffer(self, n: int) -> Tensor:
        """The screen's output for n rows, to reuse at every step of a batch: a fresh allocation
        this large is mapped anew, and its page faults cost half as much as the GEMM."""
        return torch.empty(n, self.lowT.shape[1], dtype=self.dtype)

    def screen(self, R: Tensor, F: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """|screened correlations| [n, S'] (in the screening dtype), each block's largest as the
        integers of its bits [n, S' / _BLOCK] (they order like the magnitudes), and each row's
        factors [n, 2] of ||p~_j|| and ||p_j - p~_j|| in the error bound."""
        n = len(R)
        low = R.to(self.dtype)
        Sp = self.lowT.shape[1]
        top = torch.empty(n, Sp // _BLOCK, dtype=self.bits)
        for s in range(0, Sp, _CHUNK):
            e = min(s + _CHUNK, Sp)
            torch.mm(low, self.lowT[:, s:e], out=F[:, s:e])
            bits = F[:, s:e].view(self.bits).bitwise_and_(self.magnitude)
            top[:, s // _BLOCK : e // _BLOCK] = bits.view(n, -1, _BLOCK).amax(-1)
        lowf = low.float()
        return F, top, torch.stack([(R - lowf).norm(dim=1) + self.g * lowf.norm(dim=1),
                                    R.norm(dim=1)], 1)

    def bounds(self, R: Tensor, F: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`screen`, with each block's upper bound on |<r, p_j>| [n, S' / _BLOCK] in place of
        its largest |f|."""
        F, top, ab = self.screen(R, F)
        bound = torch.addmm(top.view(self.dtype).float(), ab, self.block_terms,
                            beta=1 / (1 - self.u))
        return F, bound, ab

    def pick(self, R: Tensor, F: Tensor, chosen: Tensor, t: int, shortlist: int
             ) -> tuple[Tensor, int]:
        """Certified argmax_j |<r, p_j>| over the atoms not in `chosen[:, :t]`, per row of R (F:
        the screen's `buffer`). Returns the picks and how many rows were screened again in fp32."""
        F, bound, ab = self.bounds(R, F)
        blocks_f = F.view(self.bits).view(len(R), -1, _BLOCK)
        j = torch.empty(len(R), dtype=torch.long)
        rows = torch.arange(len(R))
        for blocks, scale in _PASSES:
            sel = rows if len(rows) < len(R) else slice(None)  # no copies in the first pass
            j[rows], ok = self._pass(blocks_f, rows, R[sel], ab[sel], bound[sel], chosen[sel, :t],
                                     blocks, shortlist * scale)
            rows = rows[~ok]
            if not len(rows):
                return j, 0
        corr = (R[rows] @ self.P.T).abs_()  # the reference's own screening
        if t:
            corr.scatter_(1, chosen[rows, :t], -1.0)
        j[rows] = corr.argmax(1)
        return j, len(rows)

    def _pass(self, blocks_f: Tensor, rows: Tensor, R: Tensor, ab: Tensor, bound: Tensor,
              chosen: Tensor, blocks: int, shortlist: int) -> tuple[Tensor, Tensor]:
        """Inspect the `blocks` blocks with the highest bounds, compute fp32 correlations for the
        `shortlist` atoms with the largest |f| in them, and certify the best one not chosen
        against the bounds of every atom not evaluated."""
        nb = bound.shape[1]
        blocks = min(blocks, nb)
        shortlist = min(shortlist, blocks * _BLOCK)
        ub, blk = bound.topk(min(blocks + 1, nb), dim=1)
        rest = ub[:, blocks] if blocks < nb else torch.full((len(R),), -_INF)
        blk = blk[:, :blocks]
        vals, at = blocks_f[rows[:, None], blk].flatten(1).topk(
            min(shortlist + 1, blocks * _BLOCK), dim=1)
        if shortlist < blocks * _BLOCK:  # the atoms not evaluated in the inspected blocks
            below = vals[:, shortlist:].view(self.dtype).float().squeeze(1) / (1 - self.u)
            slack = (ab[:, :, None] * self.block_terms[:, blk].transpose(0, 1)).sum(1).amax(1)
            rest = torch.maximum(rest, below + slack)
        at = at[:, :shortlist]
        cand = self.atom[blk.gather(1, at // _BLOCK) * _BLOCK + at % _BLOCK]  # [n, shortlist]
        Pc = self.P.index_select(0, cand.clamp_min(0).flatten()).view(*cand.shape, -1)
        corr = torch.bmm(R.unsqueeze(1), Pc.transpose(1, 2)).squeeze(1).abs_()
        corr.masked_fill_((cand < 0) | (cand[:, :, None] == chosen[:, None, :]).any(-1), -1.0)
        best = corr.amax(1, keepdim=True)
        j = torch.where(corr == best, cand, len(self.P)).amin(1)  # ties: the lowest, as argmax
        j.clamp_(0, len(self.P) - 1)
        rest = rest * (1 + 2.0**-20) + 1e-30  # the bound's own fp32 rounding; denormals
        return j, rest < best.squeeze(1) - self.g * ab[:, 1] * self.p_norm[j]

    def top(self, R: Tensor, F: Tensor, pool: int) -> Tensor:
        """The `pool` atoms with the largest |screened correlation| per row (fast mode; -1:
        padding): they lie in the `pool` blocks with the largest maxima."""
        F, top, _ = self.screen(R, F)
        n = len(R)
        blk = top.topk(min(pool, top.shape[1]), dim=1).indices
        at = F.view(self.bits).view(n, -1, _BLOCK)[torch.arange(n)[:, None], blk].flatten(1
                                                                            ).topk(pool, dim=1).indices
        return self.atom[blk.gather(1, at // _BLOCK) * _BLOCK + at % _BLOCK]


def _batch_pooled(screen: _Screen, Y: Tensor, k: int, pool: int, refresh: int, ridge: float):
    """Fast mode for one batch of targets; see `omp` for `pool`, `refresh` and `ridge`.
    Returns the atoms, coefficients, early stops, fp32 rescreens (none) and residuals."""
    P = screen.P
    n, D = Y.shape
    chol = _Cholesky(n, k, ridge)
    idx = torch.zeros(n, k, dtype=torch.long)
    YA = torch.zeros(n, k + 1, D)  # the target, then the chosen atoms (zero rows for phantoms)
    YA[:, 0] = Y
    x = torch.zeros(n, 0)
    G = torch.zeros(n, k, pool)  # <chosen atom, candidate>: a step writes one contiguous row
    Pc = torch.empty(n, pool, D)  # the candidates, rewritten in place (as the screen's output)
    F = screen.buffer(n)
    rows = torch.arange(n)
    for t in range(k):
        if t % refresh == 0:  # screen: new candidates for the current residual
            R = Y - torch.bmm(x.unsqueeze(1), YA[:, 1 : t + 1]).squeeze(1) if t else Y
            cand = screen.top(R, F, pool)
            torch.index_select(P, 0, cand.clamp_min(0).flatten(), out=Pc.view(-1, D))
            H = torch.bmm(YA[:, : t + 1], Pc.transpose(1, 2))  # [n, 1 + t, pool]
            beta, G[:, :t] = H[:, 0], H[:, 1:]
            Gcc = torch.bmm(Pc, Pc.transpose(1, 2))
            # chosen atoms are (nearly, without ridge) orthogonal to R; never pick one twice
            used = (cand.unsqueeze(-1) == idx[:, None, :t]).any(-1) | (cand < 0)
        # correlations with the residual y - A x, from inner products only: beta - G x
        corr = (beta - torch.bmm(x.unsqueeze(1), G[:, :t]).squeeze(1)).abs_()
        m = corr.masked_fill_(used, -1.0).argmax(1)
        used[rows, m] = True
        ok = chol.add(G[rows, :t, m], Gcc[rows, m, m], beta[rows, m])
        idx[:, t] = torch.where(ok, cand[rows, m], 0)
        YA[:, t + 1] = torch.where(ok.unsqueeze(-1), Pc[rows, m], 0.0)
        G[:, t] = torch.where(ok.unsqueeze(-1), Gcc[rows, m], 0.0)  # Gcc is symmetric
        x = chol.coefficients()
    return idx, x, int((~chol.alive).sum()), 0, _residual(Y, x, YA[:, 1:])


def _batch_greedy(P: Tensor, Y: Tensor, k: int, ridge: float, screen: _Screen | None,
                  shortlist: int):
    """One screening per step: the certified screen (exact mode) or, without a screen, plain
    fp32 correlations with the whole dictionary (the reference). Returns as `_batch_pooled`."""
    n, D = Y.shape
    chol = _Cholesky(n, k, ridge)
    idx = torch.zeros(n, k, dtype=torch.long)
    A = torch.zeros(n, k, D)
    x = torch.zeros(n, 0)
    R = Y
    F = None if screen is None else screen.buffer(n)
    fallbacks = 0
    for t in range(k):
        if t:
            R = Y - torch.bmm(x.unsqueeze(1), A[:, :t]).squeeze(1)
        if screen is None:
            corr = (R @ P.T).abs_()
            if t:
                corr.scatter_(1, idx[:, :t], -1.0)
            j = corr.argmax(1)
        else:
            j, fell = screen.pick(R, F, idx, t, shortlist)
            fallbacks += fell
        atom = P[j]
        g = torch.bmm(atom.unsqueeze(1), A[:, :t].transpose(1, 2)).squeeze(1)
        ok = chol.add(g, (atom * atom).sum(1), (atom * Y).sum(1))
        idx[:, t] = torch.where(ok, j, 0)
        A[:, t] = torch.where(ok.unsqueeze(-1), atom, 0.0)
        x = chol.coefficients()
    return idx, x, int((~chol.alive).sum()), fallbacks, _residual(Y, x, A)


def _residual(Y: Tensor, x: Tensor, A: Tensor) -> Tensor:
    """|y - A x| / |y| per row (0 for y = 0)."""
    norm = Y.norm(dim=1)
    r = (Y - torch.bmm(x.unsqueeze(1), A).squeeze(1)).norm(dim=1)
    return torch.where(norm > 0, r / norm.clamp_min(1e-30), 0.0)


def _batches(run: Callable[[Tensor], tuple], Y: Tensor, batch_size: int):
    """(start, run(batch)) for batches of Y's rows, in order. With several torch threads, each
    batch runs single-threaded on a worker of its own: the steps are many mid-sized operations,
    whose parallel regions (barriers, memory-bound phases) cost more than whole batches side by
    side, and much more on a busy machine. The batches are evened out over the workers."""
    workers = torch.get_num_threads()
    count = -(-len(Y) // batch_size)
    if workers > 1:  # a multiple of the workers, unless that makes batches too small
        count = max(count, min(-(-count // workers) * workers, -(-len(Y) // _MIN_BATCH)))
    size = max(1, -(-len(Y) // max(count, 1)))
    starts = range(0, len(Y), size)
    if workers == 1 or len(starts) == 1:
        for s in starts:
            yield s, run(Y[s : s + size])
        return
    ex = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
    try:
        for s, job in [(s, ex.submit(run, Y[s : s + size])) for s in starts]:
            yield s, job.result()
    finally:
        ex.shutdown(cancel_futures=True)  # on an error, no waiting for the batches queued
        torch.set_num_threads(workers)  # MKL's thread count is global


def omp(
    dictionary: Tensor,
    targets: Tensor,
    k: int,
    *,
    pool: int = 8,
    refresh: int = 1,
    batch_size: int = 1024,
    ridge: float = 0.0,
    on_batch: Callable[[int], None] | None = None,
) -> OmpResult:
    """Approximate each row of `targets` [n, D] by k rows of `dictionary` [S, D].

    `refresh=1` is exact OMP: every step screens the whole dictionary in the fast precision and
    certifies the pick with fp32 correlations of the `pool` most promising atoms (see the module
    docstring). `refresh=r > 1` is the fast mode: a screening every r steps keeps each target's
    `pool` best atoms, and the steps in between pick from them. `pool=0` is the reference:
    plain fp32 correlations with the whole dictionary at every step. `ridge` > 0 solves ridge
    least squares with that fraction of the dictionary's mean squared atom norm on the Gram
    diagonal: it bounds the coefficients, which the transfer applies to *another* space where the
    chosen atoms need not be as collinear (unbounded coefficients there give rows of enormous
    norm). `on_batch(n)` reports progress.
    """
    P = dictionary.float().contiguous()  # built once for all batches
    Y = targets.float()
    S, n = len(P), len(Y)
    if not 0 < k <= S:
        raise ValueError(f"k={k} must be between 1 and the dictionary size {S}")
    refresh = max(1, refresh)
    pool = min(pool, S)
    screen = _Screen(P, fast_dtype()) if pool else None
    lam = ridge * float((P * P).sum(1).mean())

    def run(Yb: Tensor):
        if screen is not None and refresh > 1:
            return _batch_pooled(screen, Yb, k, pool, refresh, lam)
        return _batch_greedy(P, Yb, k, lam, screen, pool)

    indices = torch.zeros(n, k, dtype=torch.long)
    coefs, residual = torch.zeros(n, k), torch.zeros(n)
    stopped = fallbacks = 0
    for s, (idx, x, stop, fell, res) in _batches(run, Y, batch_size):
        e = s + len(idx)
        indices[s:e], coefs[s:e], residual[s:e] = idx, x, res
        stopped += stop
        fallbacks += fell
        if on_batch is not None:
            on_batch(len(idx))
    return OmpResult(indices, coefs, residual, stopped, fallbacks)
