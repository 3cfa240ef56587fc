"""Approximate Likelihood Matching (docs/alm.md): per aligned chunk, match the student's
log-likelihood of the chunk's text to the teacher's. Pure functions of per-token quantities.

Chunk tensors are [B, T] int64 chunk ids (-1: not scored) as the collator makes them; chunk ids
of one example are 0..C_b-1 and every chunk has at least one token on each side.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ctd.errors import CtdError

EPS = 1e-6
_MINUS_LN2 = -math.log(2)  # where log1mexp switches formulas (Maechler 2012)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > _MINUS_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def num_chunk_slots(teacher_chunks: Tensor, student_chunks: Tensor) -> int:
    """A static bound on chunks per example (chunks <= tokens on either side): no host sync."""
    return min(teacher_chunks.shape[1], student_chunks.shape[1])


def chunk_sum(values: Tensor, chunks: Tensor, slots: int) -> Tensor:
    """[B, T] per token -> [B, slots] per chunk (tokens with id -1 go nowhere)."""
    idx = chunks.masked_fill(chunks < 0, slots)
    out = values.new_zeros(values.shape[0], slots + 1).scatter_add(1, idx, values)
    return out[:, :slots]


def chunk_last(chunks: Tensor, slots: int) -> Tensor:
    """[B, slots] position of each chunk's last token; -1 for chunks that do not exist."""
    idx = chunks.masked_fill(chunks < 0, slots)
    pos = torch.arange(chunks.shape[1], device=chunks.device).expand_as(chunks)
    out = torch.full((chunks.shape[0], slots + 1), -1, dtype=torch.long, device=chunks.device)
    return out.scatter_reduce(1, idx, pos, "amax")[:, :slots]


def at(values: Tensor, positions: Tensor) -> Tensor:
    """values[b, positions[b, c]] (0 where the position is -1)."""
    return torch.where(positions >= 0, values.gather(1, positions.clamp(min=0)), 0)


# Distances between chunk log-likelihoods lt (teacher) and ls (student), both <= 0, per chunk.
def binary_ce(lt: Tensor, ls: Tensor, tau: float) -> Tensor:
    """Cross-entropy of Bernoulli(p_S^(1/tau)) under Bernoulli(p_T^(1/tau)), minus the teacher's
    entropy (a constant in the student): same gradient, and exactly 0 when the two agree."""
    a, b = lt / tau - EPS, ls / tau - EPS
    pa = a.exp()
    return pa * (a - b) + (1 - pa) * (log1mexp(a) - log1mexp(b))


def reverse_binary_kl(lt: Tensor, ls: Tensor, tau: float) -> Tensor:
    """KL(Bernoulli(p_S^(1/tau)) || Bernoulli(p_T^(1/tau))): mode-seeking."""
    return binary_ce(ls, lt, tau)


def abs_distance(lt: Tensor, ls: Tensor, tau: float) -> Tensor:
    """|l_T - l_S| in nats; tau unused."""
    return (lt - ls).abs()


def binary_kl_temp_limit(lt: Tensor, ls: Tensor, tau: float) -> Tensor:
    """lim tau->inf of tau * binary KL: (l_T - l_S) + l_T log(l_S / l_T); tau unused."""
    a, b = lt - EPS, ls - EPS
    return (a - b) + a * torch.log(b / a)


DISTANCES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "binary_ce": binary_ce,
    "abs": abs_distance,
    "reverse_binary_kl": reverse_binary_kl,
    "binary_kl_temp_limit": binary_kl_temp_limit,
}


def merge_chunks(
    teacher_chunks: Tensor, student_chunks: Tensor, teacher_boundary: Tensor, gamma: float
) -> tuple[Tensor, Tensor]:
    """merge_by_space_prob: a chunk closes only where the teacher gives the next token a word
    start with probability > gamma (an example's last chunk always closes); open chunks join
    the next closing one. Returns the merged chunk ids of both sides."""
    slots = num_chunk_slots(teacher_chunks, student_chunks)
    ends = chunk_last(teacher_chunks, slots)
    exists = ends >= 0
    last = exists & ~torch.nn.functional.pad(exists[:, 1:], (0, 1))
    close = (at(teacher_boundary, ends).exp() > gamma) & exists | last
    group = close.long().cumsum(1) - close.long()

    def remap(chunks: Tensor) -> Tensor:
        return torch.where(chunks >= 0, group.gather(1, chunks.clamp(min=0)), chunks)

    return remap(teacher_chunks), remap(student_chunks)


def chunk_logliks(
    teacher_lp: Tensor,
    student_lp: Tensor,
    teacher_chunks: Tensor,
    student_chunks: Tensor,
    teacher_boundary: Tensor | None = None,
    student_boundary: Tensor | None = None,
    gamma: float | None = None,
    append_space: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """l_T and l_S per chunk, [B, slots] each, and which chunks exist: what ALM compares.

    `gamma` (None: off) merges chunks by the teacher's word-boundary probability; `append_space`
    adds each side's word-boundary log-prob at the chunk's end to its chunk log-likelihood.
    Without both, the chunks' l_T (l_S) sum to the teacher's (student's) log-likelihood of the
    scored text."""
    if gamma is not None:
        teacher_chunks, student_chunks = merge_chunks(
            teacher_chunks, student_chunks, teacher_boundary, gamma
        )
    slots = num_chunk_slots(teacher_chunks, student_chunks)
    lt = chunk_sum(teacher_lp, teacher_chunks, slots)
    ls = chunk_sum(student_lp, student_chunks, slots)
    t_end = chunk_last(teacher_chunks, slots)
    if append_space:
        lt = lt + at(teacher_boundary, t_end)
        ls = ls + at(student_boundary, chunk_last(student_chunks, slots))
    return lt, ls, t_end >= 0


def alm_loss(
    teacher_lp: Tensor,
    student_lp: Tensor,
    teacher_chunks: Tensor,
    student_chunks: Tensor,
    distance: str = "binary_ce",
    tau: float = 100.0,
    teacher_boundary: Tensor | None = None,
    student_boundary: Tensor | None = None,
    gamma: float | None = 0.1,
    append_space: bool = True,
) -> Tensor:
    """Sum over chunks of distance(l_T(c), l_S(c)) (`chunk_logliks`); the caller divides by
    the global chunk count."""
    lt, ls, exists = chunk_logliks(teacher_lp, student_lp, teacher_chunks, student_chunks,
                                   teacher_boundary, student_boundary, gamma, append_space)
    per_chunk = DISTANCES[distance](lt.clamp(max=0), ls.clamp(max=0), tau)
    return torch.where(exists, per_chunk, 0).sum()


def alm_hidden_loss(
    teacher_hidden: Tensor, student_hidden: Tensor, teacher_chunks: Tensor, student_chunks: Tensor
) -> Tensor:
    """Sum over chunks of sum_channels (h_S - h_T)^2 / (per-channel mean of h_T^2 + 1e-8), both
    taken at the chunk's last token (self-distillation: same hidden size)."""
    if teacher_hidden.shape[-1] != student_hidden.shape[-1]:
        raise CtdError(
            f"alm_hidden needs equal hidden sizes (teacher {teacher_hidden.shape[-1]}, student "
            f"{student_hidden.shape[-1]}); use it for self-distillation only"
        )
    slots = num_chunk_slots(teacher_chunks, student_chunks)
    t_end, s_end = chunk_last(teacher_chunks, slots), chunk_last(student_chunks, slots)
    rows = torch.nonzero(t_end >= 0, as_tuple=True)
    ht = teacher_hidden[rows[0], t_end[rows]].float()
    hs = student_hidden[rows[0], s_end[rows]].float()
    scale = ht.pow(2).mean(0) + 1e-8
    return ((hs - ht).pow(2) / scale).sum()
