"""Per-token quantities from hidden states without ever holding two [B, T, V] tensors.

Every loss here needs only a few numbers per position (the target token's log-prob, the
probability that the next token starts a word, a sorted or gathered slice of the distribution).
They are computed over chunks of positions. For backward, the student's target and
word-boundary log-probs keep one fp32 tensor of exponentials per chunk when the whole batch's
fits in `SAVED_BYTES` (Gemma's V = 262,144 makes [4, 512, V] 2 GiB; plain cross-entropy holds
two such tensors); beyond that, and in the other losses, each chunk is checkpointed: its logits
are recomputed in backward instead of kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ctd.tokens import byte_vocab

ROW_ELEMENTS = 1 << 25  # logits elements per chunk of positions (128 MiB in fp32)
SAVED_BYTES = 4 << 30  # token_logprobs keeps exponentials for backward up to this size


def output_head(model) -> Callable[[Tensor], Tensor]:
    """hidden [.., H] -> logits [.., V]: the LM head plus final logit soft-capping (Gemma-2)."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda h: torch.tanh(head(h) / cap) * cap


def hidden_states(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last hidden state [B, T, H] from the decoder alone (no logits); works through peft."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def word_start_mask(tokenizer) -> Tensor:
    """Bool [V]: tokens that start a new word (leading space/tab/newline) or are special."""
    return torch.from_numpy(byte_vocab(tokenizer).starts_word.copy())


def keeps_exponentials(positions: int, vocab_size: int) -> bool:
    """Whether backward may keep fp32 exponentials for all positions (within SAVED_BYTES)."""
    return positions * vocab_size * 4 <= SAVED_BYTES


def chunk_rows(vocab_size: int) -> int:
    """Positions per chunk so that one chunk's fp32 logits stay near ROW_ELEMENTS."""
    return max(8, ROW_ELEMENTS // max(vocab_size, 1))


def map_rows(fn: Callable[..., Tensor], *rows: Tensor, chunk: int, recompute: bool = True
             ) -> Tensor:
    """fn over chunks of rows (all inputs share dim 0), concatenated. With `recompute`, each
    chunk is checkpointed when a gradient is needed, so fn's [chunk, V] intermediates are not
    kept for backward."""
    grad = recompute and torch.is_grad_enabled() and any(r.requires_grad for r in rows)
    outs = []
    for i in range(0, rows[0].shape[0], chunk):
        part = [r[i : i + chunk] for r in rows]
        outs.append(checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part))
    if not outs:
        return fn(*rows)
    return torch.cat(outs)


def upcast(x: Tensor) -> Tensor:
    """fp16/bf16 logits to fp32 for the softmax math; fp32/fp64 unchanged."""
    return x.float() if x.element_size() < 4 else x


def _fit(mask: Tensor, size: int) -> Tensor:
    """A tokenizer mask padded (False) to the model's vocabulary, which may be larger."""
    return F.pad(mask, (0, size - mask.numel())) if mask.numel() < size else mask[:size]


def _logit_stats(shifted: Tensor, target: Tensor, words: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """`_LogitStats`' forward from `shifted` = logits minus their row maxima (at least fp32),
    which becomes the exponentials: (stats [n, 1 or 2], exponentials, sums, word mask as floats)."""
    picked = shifted.gather(1, target).squeeze(1)
    e = shifted.exp_()
    words = words.to(e.dtype) if words is not None else None
    # [n, 1 or 2]: total mass, word-start mass (two mat-vecs: 3x faster than one [V, 2] GEMM)
    sums = torch.stack([e.sum(-1)] + ([e @ words] if words is not None else []), 1)
    log_total = sums[:, 0].log()
    out = [picked - log_total]
    if words is not None:
        out.append(sums[:, 1].clamp_min(torch.finfo(e.dtype).tiny).log() - log_total)
    return torch.stack(out, 1), e, sums, words


class _LogitStats(torch.autograd.Function):
    """logits [n, V] -> [n, 1 or 2]: the target's log-prob, and the log-mass of word-start tokens.

    One exp pass serves both sums; backward writes the logits' gradient
    in closed form from the saved exponentials (d lp/dz = onehot - p,
    d boundary/dz = p_words / P_words - p) instead of replaying an autograd graph of [n, V]
    intermediates: about half the passes over the logits.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, words: Tensor | None) -> Tensor:
        out, e, sums, words = _logit_stats(logits - logits.amax(-1, keepdim=True), target, words)
        ctx.save_for_backward(e, target, sums, words)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        e, target, sums, words = ctx.saved_tensors
        per_p = -grad.sum(1, keepdim=True) / sums[:, :1]  # both outputs subtract p
        if words is None:
            coef = per_p
        else:
            w = sums[:, 1:]
            per_word = torch.where(w > torch.finfo(e.dtype).tiny, grad[:, 1:] / w, 0.0)
            coef = torch.addcmul(per_p, per_word, words)  # [n, V]; 2x faster than a where
        out = (coef * e if words is None else coef.mul_(e)).scatter_add_(1, target, grad[:, :1])
        return out, None, None


def _head_into(head: Callable[[Tensor], Tensor], hs: Tensor,
               reused: Callable[[int, int, torch.dtype], Tensor]) -> Tensor:
    """head(hs), written into a reused buffer when calling the head would run exactly one GEMM
    of hs with its whole weight (bit for bit the same); otherwise the head is called. Called
    means: soft-capping, a bias, autocast (the GEMM's precision is autocast's), hooks or a
    replaced forward (DeepSpeed ZeRO-3 gathers a partitioned weight in a hook, accelerate
    offloads through a forward of its own)."""
    plain = (type(head) is torch.nn.Linear and head.bias is None and "forward" not in vars(head)
             and not head._forward_hooks and not head._forward_pre_hooks
             and head.weight.shape == (head.out_features, head.in_features)
             and head.weight.dtype == hs.dtype and hs.dim() == 2
             and not torch.is_autocast_enabled(hs.device.type))
    if plain:
        return torch.mm(hs, head.weight.t(), out=reused(len(hs), head.out_features, hs.dtype))
    return head(hs)


def token_logprobs(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    input_ids: Tensor,
    word_mask: Tensor | None = None,
    chunk: int = 256,
    recompute: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Target log-probs and word-boundary log-probs, both [B, T] (at least fp32).

    `recompute=False` keeps each chunk's fp32 exponentials for backward instead of recomputing
    the logits (see `keeps_exponentials`).

    lp[:, i] = log p(x_i | x_<i) (0 at i = 0, which nothing predicts);
    boundary[:, i] = log sum_{v in word_mask} p(v | x_<=i) (None without a mask).
    """
    b, t, h = hidden.shape
    nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).reshape(-1, 1)
    mask = word_mask.to(hidden.device) if word_mask is not None else None
    # inference (teacher cache, live teacher, evaluation): each chunk's logits and their fp32
    # exponentials go into buffers reused by every chunk, not fresh [chunk, V] tensors (mapped
    # anew, page by page, each time): these passes become 3-4x faster
    buffers: dict[torch.dtype, Tensor] = {}

    def reused(n: int, v: int, dtype: torch.dtype) -> Tensor:
        buf = buffers.get(dtype)
        if buf is None or buf.shape[1] != v or len(buf) < n:
            buf = buffers[dtype] = hidden.new_empty(n, v, dtype=dtype)
        return buf[:n]

    def rows(hs: Tensor, target: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            logits = head(hs)
            words = _fit(mask, logits.shape[-1]) if mask is not None else None
            return _LogitStats.apply(upcast(logits), target, words)
        logits = _head_into(head, hs, reused)
        n, v = logits.shape
        words = _fit(mask, v) if mask is not None else None
        wide = torch.promote_types(logits.dtype, torch.float32)
        shifted = logits if logits.dtype == wide else reused(n, v, wide).copy_(logits)
        return _logit_stats(shifted.sub_(shifted.amax(-1, keepdim=True)), target, words)[0]

    stats = map_rows(rows, hidden.reshape(-1, h), nxt, chunk=chunk, recompute=recompute)
    stats = stats.view(b, t, -1)
    lp = F.pad(stats[:, :-1, 0], (1, 0))
    return lp, (stats[..., 1] if mask is not None else None)
