"""Universal Logit Distillation (Boizard et al. 2024): at paired positions, the L1 distance
between the teacher's and the student's probability vectors sorted in descending order (the
closed-form Wasserstein-1 under a uniform ground cost), so no vocabulary mapping is needed.

Published ULD pairs the k-th response token of the teacher with the k-th of the student; the
chunk-aligned variant pairs the distributions that predict each chunk's first token, which are
conditioned on exactly the same text on both sides.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ctd.losses.logprobs import map_rows, upcast


def sorted_l1(pt: Tensor, ps: Tensor) -> Tensor:
    """[N] sum |sort(ps) - sort(pt)| with the shorter vocabulary zero-padded."""
    pt = pt.sort(dim=-1, descending=True).values
    ps = ps.sort(dim=-1, descending=True).values
    width = max(pt.shape[-1], ps.shape[-1])
    pt, ps = F.pad(pt, (0, width - pt.shape[-1])), F.pad(ps, (0, width - ps.shape[-1]))
    return (ps - pt).abs().sum(-1)


def first_of_chunk(chunks: Tensor) -> Tensor:
    """Bool [B, T]: the first token of each chunk."""
    return (chunks >= 0) & (chunks != F.pad(chunks[:, :-1], (1, 0), value=-1))


def paired_rows(t_sel: Tensor, s_sel: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Pair the k-th selected target token of each side (k < the smaller count per example);
    returns (batch, position) of the hidden state that predicts it, per side."""
    m = torch.minimum(t_sel.sum(1), s_sel.sum(1))[:, None]
    t_sel = t_sel & (t_sel.long().cumsum(1) <= m)
    s_sel = s_sel & (s_sel.long().cumsum(1) <= m)
    (tb, tp), (sb, sp) = t_sel.nonzero(as_tuple=True), s_sel.nonzero(as_tuple=True)
    return (tb, tp - 1), (sb, sp - 1)


def uld_loss(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    teacher_head: Callable[[Tensor], Tensor],
    student_head: Callable[[Tensor], Tensor],
    teacher_chunks: Tensor,
    student_chunks: Tensor,
    student_loss_mask: Tensor,
    chunked: bool = False,
    chunk: int = 64,
) -> Tensor:
    """Sum over paired positions of the sorted-probability L1 distance."""
    if chunked:
        t_sel, s_sel = first_of_chunk(teacher_chunks), first_of_chunk(student_chunks)
    else:
        t_sel, s_sel = teacher_chunks >= 0, student_loss_mask
    t_at, s_at = paired_rows(t_sel, s_sel)

    def rows(th: Tensor, sh: Tensor) -> Tensor:
        with torch.no_grad():
            pt = upcast(teacher_head(th)).softmax(-1)
        return sorted_l1(pt, upcast(student_head(sh)).softmax(-1))

    # sort keeps values and int64 indices: a quarter of the log-prob chunk keeps memory level.
    return map_rows(rows, teacher_hidden[t_at], student_hidden[s_at], chunk=max(chunk // 4, 1)).sum()
