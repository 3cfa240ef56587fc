"""kd_shared: token-level KD over the vocabulary the two tokenizers share, on 1:1 chunks.

Where a chunk is exactly one teacher token and one student token, both models predict the same
text from the same prefix, so their next-token distributions are comparable on tokens with the
same bytes. The mapping is exact byte match (MinED's edit-distance fallback for the rest is
not built); both distributions are renormalised over the shared tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ctd.errors import CtdError
from ctd.losses.alm import chunk_sum, num_chunk_slots
from ctd.losses.logprobs import map_rows, upcast
from ctd.tokens import byte_vocab


def shared_vocab(teacher_tokenizer, student_tokenizer) -> tuple[Tensor, Tensor]:
    """(teacher ids, student ids) of the non-special tokens with identical bytes."""
    tv, sv = byte_vocab(teacher_tokenizer), byte_vocab(student_tokenizer)
    index = {p: i for i, p in enumerate(sv.pieces) if p and not sv.is_special[i]}
    pairs = np.array(
        [(i, index[p]) for i, p in enumerate(tv.pieces) if p and not tv.is_special[i] and p in index],
        dtype=np.int64,
    ).reshape(-1, 2)
    if not len(pairs):
        raise CtdError(f"{tv.name} and {sv.name} share no token; kd_shared cannot be used")
    return torch.from_numpy(pairs[:, 0].copy()), torch.from_numpy(pairs[:, 1].copy())


def one_to_one(chunks: Tensor, other: Tensor) -> Tensor:
    """Bool [B, T] over `chunks`' side: tokens alone in a chunk that is one token on both sides."""
    slots = num_chunk_slots(chunks, other)
    ones = (chunks >= 0).float()
    single = (chunk_sum(ones, chunks, slots) == 1) & (chunk_sum((other >= 0).float(), other, slots) == 1)
    return (chunks >= 0) & single.gather(1, chunks.clamp(min=0))


def kd_shared_loss(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    teacher_head: Callable[[Tensor], Tensor],
    student_head: Callable[[Tensor], Tensor],
    teacher_chunks: Tensor,
    student_chunks: Tensor,
    shared: tuple[Tensor, Tensor],
    chunk: int = 64,
) -> Tensor:
    """Sum over 1:1 chunks of KL(teacher || student) on the shared vocabulary."""
    tid, sid = (ids.to(student_hidden.device) for ids in shared)
    t_sel = one_to_one(teacher_chunks, student_chunks)
    s_sel = one_to_one(student_chunks, teacher_chunks)
    tb, tp = t_sel.nonzero(as_tuple=True)  # the same chunks, in the same order, on both sides
    sb, sp = s_sel.nonzero(as_tuple=True)

    def rows(th: Tensor, sh: Tensor) -> Tensor:
        with torch.no_grad():
            lt = upcast(teacher_head(th))[:, tid].log_softmax(-1)
        ls = upcast(student_head(sh))[:, sid].log_softmax(-1)
        return (lt.exp() * (lt - ls)).sum(-1)

    return map_rows(rows, teacher_hidden[tb, tp - 1], student_hidden[sb, sp - 1], chunk=chunk).sum()
