"""Texts -> aligned teacher/student batches, in DataLoader workers.

Each text is tokenized once per side (ctd.tokens.encode: byte-exact or a CtdError) and aligned
(ctd.align). Handling of awkward input, all counted in `stats`:
- Too long: both sides are cut after the last chunk that fits both token budgets
  (`max_length`, doc-start token included), so they always stop at the same byte.
- Prompt/response: the joined text is tokenized as one (the tokenization the model sees); chunks
  of the prompt get id -1, and a chunk whose tokens straddle the prompt/response boundary is
  dropped (`dropped_chunks`) rather than half-counted.
- Empty text or empty response: an example with no chunks (only the doc-start token).
- Special-token strings in the text ("<bos>", "<|im_end|>") are literal text on both sides.
- A text a tokenizer cannot reproduce byte-exactly: CtdError, or with `skip_unencodable` an
  empty example counted in `stats["unencodable"]`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from ctd.align import align, chunks_within, common_text
from ctd.errors import CtdError
from ctd.tokens import Encoded, doc_start_id, encode

_EMPTY = Encoded(np.zeros(0, np.int64), np.zeros(0, np.int64))


class AlignedCollator:
    """Batches of {"text"} or {"prompt", "response"} examples for cross-tokenizer losses."""

    def __init__(
        self,
        teacher_tokenizer,
        student_tokenizer,
        max_length: int = 512,
        skip_unencodable: bool = False,
    ):
        if max_length < 2:
            raise CtdError(f"max_length must be at least 2 (doc-start + one token), got {max_length}")
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.max_length = max_length
        self.skip_unencodable = skip_unencodable
        self.teacher_start = doc_start_id(teacher_tokenizer)
        self.student_start = doc_start_id(student_tokenizer)
        self.stats: Counter = Counter()  # running totals since construction (per worker)

    def _encode(self, tokenizer, texts: list[str]) -> list[Encoded]:
        try:
            return encode(tokenizer, texts)
        except CtdError:
            if not self.skip_unencodable:
                raise
        out = []  # find the culprits one by one; only on the rare failing batch
        for text in texts:
            try:
                out.append(encode(tokenizer, [text])[0])
            except CtdError:
                self.stats["unencodable"] += 1
                out.append(None)
        return out

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return pad(self.rows(examples), self.teacher_start, self.student_start)

    def rows(self, examples: list[dict]) -> list[dict[str, np.ndarray | int]]:
        """Tokenize and align each example: its kept token ids and chunk ids per side, and its
        counts (the slow part; `ctd.data` runs it once per corpus in a cached `datasets.map`)."""
        tt, st = self.teacher_tokenizer, self.student_tokenizer
        prompts = [common_text(ex.get("prompt", ""), tt, st) for ex in examples]
        texts = [
            p + common_text(ex["response"] if "prompt" in ex else ex["text"], tt, st)
            for p, ex in zip(prompts, examples, strict=True)
        ]
        enc_t, enc_s = self._encode(tt, texts), self._encode(st, texts)
        rows = []
        for et, es, prompt in zip(enc_t, enc_s, prompts, strict=True):
            if et is None or es is None:
                et = es = _EMPTY
            rows.append(self._row(et, es, len(prompt.encode())))
        self.stats["examples"] += len(rows)
        for key in ("num_chunks", "num_bytes", "dropped_chunks", "truncated_chunks"):
            self.stats[key.removeprefix("num_")] += sum(r[key] for r in rows)
        self.stats["truncated_examples"] += sum(r["truncated_chunks"] > 0 for r in rows)
        self.stats["empty_examples"] += sum(r["num_chunks"] == 0 for r in rows)
        return rows

    def _row(self, et: Encoded, es: Encoded, prompt_bytes: int):
        """One example: kept token ids and response chunk ids per side, and its counts."""
        al = align(et, es)
        keep = chunks_within(al, self.max_length - 1, self.max_length - 1)
        ends = al.ends[:keep]
        n_t = int(np.searchsorted(al.teacher, keep, side="left"))
        n_s = int(np.searchsorted(al.student, keep, side="left"))
        # Chunks ending at or before the prompt's end are prompt; the first one after it is
        # dropped if it starts before the prompt's end (its tokens straddle the boundary).
        first = int(np.searchsorted(ends, prompt_bytes, side="right"))
        start = ends[first - 1] if first else 0
        straddles = first < keep and start < prompt_bytes
        first_scored = first + int(straddles)

        def relabel(chunks: np.ndarray) -> np.ndarray:
            c = chunks - first_scored
            c[c < 0] = -1
            return c

        num = max(keep - first_scored, 0)
        scored_from = int(ends[first_scored - 1]) if first_scored else 0
        return {
            "teacher_ids": et.ids[:n_t], "teacher_chunks": relabel(al.teacher[:n_t]),
            "student_ids": es.ids[:n_s], "student_chunks": relabel(al.student[:n_s]),
            "num_chunks": num, "num_bytes": int(ends[-1]) - scored_from if num else 0,
            "dropped_chunks": int(straddles), "truncated_chunks": al.num_chunks - keep,
        }


def pad(rows: list[dict], teacher_start: int, student_start: int) -> dict[str, torch.Tensor]:
    """Aligned rows (`AlignedCollator.rows`) -> the padded batch, doc-start token first on both
    sides. Cheap: what DataLoader workers do per batch once the rows are cached."""
    n = len(rows)
    width_t = 1 + max(len(r["teacher_ids"]) for r in rows)
    width_s = 1 + max(len(r["student_ids"]) for r in rows)
    t_ids = np.zeros((n, width_t), np.int64)
    s_ids = np.zeros((n, width_s), np.int64)
    t_chunk = np.full((n, width_t), -1, np.int64)
    s_chunk = np.full((n, width_s), -1, np.int64)
    t_mask = np.zeros((n, width_t), np.int64)
    s_mask = np.zeros((n, width_s), np.int64)
    for b, r in enumerate(rows):
        lt, ls = len(r["teacher_ids"]), len(r["student_ids"])
        t_ids[b, 0], s_ids[b, 0] = teacher_start, student_start
        t_ids[b, 1 : 1 + lt], t_chunk[b, 1 : 1 + lt] = r["teacher_ids"], r["teacher_chunks"]
        s_ids[b, 1 : 1 + ls], s_chunk[b, 1 : 1 + ls] = r["student_ids"], r["student_chunks"]
        t_mask[b, : 1 + lt] = 1
        s_mask[b, : 1 + ls] = 1
    counts = {k: torch.tensor([int(r[k]) for r in rows])
              for k in ("num_chunks", "num_bytes", "dropped_chunks")}
    return {
        "teacher_input_ids": torch.from_numpy(t_ids),
        "teacher_attention_mask": torch.from_numpy(t_mask),
        "student_input_ids": torch.from_numpy(s_ids),
        "student_attention_mask": torch.from_numpy(s_mask),
        "teacher_chunk_ids": torch.from_numpy(t_chunk),
        "student_chunk_ids": torch.from_numpy(s_chunk),
        "student_loss_mask": torch.from_numpy(s_chunk >= 0),
        **counts,
    }
