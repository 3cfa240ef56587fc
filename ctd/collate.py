"""Examples -> aligned rows (the slow, one-time part of the input pipeline) -> padded batches.

Each text is tokenized once per side (ctd.tokens, byte-exact) and aligned (ctd.align). A
document longer than `max_length` tokens is cut into consecutive windows that end on chunk
boundaries (byte offsets where both sides end a token), so every byte is trained on and both
sides of a window cover the same bytes; each window starts with the doc-start token on each
side. Awkward input, all counted in the rows' columns:
- A chunk longer than a whole window on one side (rare: long runs where the tokenizations never
  agree) is dropped (`dropped_chunks`), and the next window starts after it.
- Prompt/response: the joined text is normalised and tokenized as one (the tokenization the
  model sees); chunks of the prompt get id -1, a chunk whose tokens straddle the prompt/response
  boundary is dropped rather than half-counted, and only the first window is kept (a response
  window without its prompt would teach the wrong thing): what is cut is `truncated_chunks`.
- Empty text: no rows.
- Special-token strings in the text ("<bos>", "<|im_end|>") are literal text on both sides.
- A text a tokenizer cannot reproduce byte-exactly gives one row with no chunks that says which
  side failed, where and how many bytes were lost (`strict`: a CtdError naming the document).
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch

from ctd.align import align, common_text, tokens_through
from ctd.errors import CtdError
from ctd.tokens import Encoded, Unencodable, doc_start_id, encode_or_explain

# Per-row counts (int64 columns of the cached rows).
COUNTS = ("num_chunks", "num_bytes", "dropped_chunks", "truncated_chunks", "loss_tokens",
          "document", "unencodable", "lost_bytes")
# `unencodable` is a bit mask of the sides that could not reproduce the document:
TEACHER, STUDENT = 1, 2


class Aligner:
    """Aligned rows of {"text"} or {"prompt", "response"} examples for cross-tokenizer losses."""

    def __init__(self, teacher_tokenizer, student_tokenizer, max_length: int = 512,
                 windows: bool = True, strict: bool = False):
        if max_length < 2:
            raise CtdError(f"max_length must be at least 2 (doc-start + one token), got {max_length}")
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.max_length, self.windows, self.strict = max_length, windows, strict
        self.teacher_start = doc_start_id(teacher_tokenizer)
        self.student_start = doc_start_id(student_tokenizer)

    def batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Rows of `examples`, padded into one batch (for tests and benchmarks; training reads
        the cached rows)."""
        return pad([r for r in self.rows(examples) if r["unencodable"] == 0],
                   self.teacher_start, self.student_start)

    def rows(self, examples: list[dict], first_document: int = 0) -> list[dict]:
        """Tokenize and align each example into one or more rows (windows): kept token ids and
        chunk ids per side, and the counts in COUNTS. `document` numbers the examples from
        `first_document`."""
        tt, st = self.teacher_tokenizer, self.student_tokenizer
        texts, prompt_bytes = [], []
        for ex in examples:
            if "prompt" in ex:
                text = common_text(ex["prompt"] + ex["response"], tt, st)
                prompt = common_text(ex["prompt"], tt, st)
                # the prompt's end in the normalised joined text (NFC may merge a combining mark
                # that starts the response into the prompt's last character)
                prompt_bytes.append(len(os.path.commonprefix([prompt, text]).encode()))
            else:
                text = common_text(ex["text"], tt, st)
                prompt_bytes.append(-1)
            texts.append(text)
        enc_t, enc_s = encode_or_explain(tt, texts), encode_or_explain(st, texts)
        rows = []
        for i, (text, et, es, pb) in enumerate(zip(texts, enc_t, enc_s, prompt_bytes,
                                                   strict=True)):
            doc = first_document + i
            if isinstance(et, Unencodable) or isinstance(es, Unencodable):
                rows.append(self._unencodable(text, et, es, doc))
            elif pb >= 0:
                rows.extend(self._windows(et, es, doc, prompt_bytes=pb, first_only=True))
            else:
                rows.extend(self._windows(et, es, doc, first_only=not self.windows))
        return rows

    def _unencodable(self, text: str, et, es, doc: int) -> dict:
        bad = [e for e in (et, es) if isinstance(e, Unencodable)]
        if self.strict:
            raise CtdError(f"document {doc}: {bad[0].message(text)}; remove it, or set "
                           "data.strict false to skip such documents")
        side = (TEACHER if isinstance(et, Unencodable) else 0) | (
            STUDENT if isinstance(es, Unencodable) else 0)
        row = _row(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                   np.zeros(0, np.int64), doc=doc, unencodable=side, lost_bytes=len(text.encode()))
        row["problem"] = f"{bad[0].char!r} at byte {bad[0].offset}"
        return row

    def _windows(self, et: Encoded, es: Encoded, doc: int, prompt_bytes: int = -1,
                 first_only: bool = False) -> list[dict]:
        """Consecutive windows of at most max_length - 1 tokens per side on chunk boundaries."""
        al = align(et, es)
        n = al.num_chunks
        through_t, through_s = tokens_through(al.teacher, n), tokens_through(al.student, n)
        budget = self.max_length - 1
        # chunks ending at or before the prompt's end are prompt; the first one after it is
        # dropped if it starts before the prompt's end (its tokens straddle the boundary)
        first = int(np.searchsorted(al.ends, prompt_bytes, side="right")) if prompt_bytes >= 0 else 0
        straddles = prompt_bytes >= 0 and first < n and (al.ends[first - 1] if first else 0) < prompt_bytes
        scored = first + int(straddles)
        rows, c0, dropped = [], 0, 0
        while c0 < n:
            t0 = int(through_t[c0 - 1]) if c0 else 0
            s0 = int(through_s[c0 - 1]) if c0 else 0
            c1 = min(int(np.searchsorted(through_t, t0 + budget, side="right")),
                     int(np.searchsorted(through_s, s0 + budget, side="right")))
            if c1 == c0:  # one chunk is longer than a window on one side: skip it
                dropped += 1
                c0 += 1
                continue
            t1, s1 = int(through_t[c1 - 1]), int(through_s[c1 - 1])
            base = max(c0, scored)
            num = max(c1 - base, 0)
            start_byte = int(al.ends[base - 1]) if base else 0
            rows.append(_row(et.ids[t0:t1], _relabel(al.teacher[t0:t1], base),
                             es.ids[s0:s1], _relabel(al.student[s0:s1], base), doc=doc,
                             num_chunks=num, num_bytes=int(al.ends[c1 - 1]) - start_byte if num else 0,
                             dropped_chunks=dropped + int(straddles and c0 == 0)))
            dropped = 0
            c0 = c1
            if first_only:
                rows[-1]["truncated_chunks"] = n - c1
                break
        if not rows:  # empty, or nothing fit: one empty row keeps the document counted
            rows.append(_row(*(np.zeros(0, np.int64),) * 4, doc=doc))
        rows[-1]["dropped_chunks"] += dropped
        return rows


def _relabel(chunks: np.ndarray, first_scored: int) -> np.ndarray:
    """Chunk ids counted from the window's first scored chunk; earlier ones (prompt) -1."""
    c = chunks - first_scored
    c[c < 0] = -1
    return c


def _row(t_ids, t_chunks, s_ids, s_chunks, doc: int, num_chunks: int = 0, num_bytes: int = 0,
         dropped_chunks: int = 0, unencodable: int = 0, lost_bytes: int = 0) -> dict:
    return {"teacher_ids": t_ids, "teacher_chunks": t_chunks, "student_ids": s_ids,
            "student_chunks": s_chunks, "num_chunks": num_chunks, "num_bytes": num_bytes,
            "dropped_chunks": dropped_chunks, "truncated_chunks": 0,
            "loss_tokens": int((s_chunks >= 0).sum()), "document": doc,
            "unencodable": unencodable, "lost_bytes": lost_bytes, "problem": ""}


def stats(columns: dict[str, np.ndarray], problems: list[str] = ()) -> dict[str, object]:
    """What the rows of a corpus hold, from their count columns: documents, windows, bytes
    trained on, and what was dropped or skipped (per side, with up to 3 examples)."""
    unenc = columns["unencodable"]
    ok = unenc == 0
    out: Counter = Counter(
        documents=len(np.unique(columns["document"])), windows=int((columns["num_chunks"] > 0).sum()),
        chunks=int(columns["num_chunks"].sum()), bytes=int(columns["num_bytes"].sum()),
        dropped_chunks=int(columns["dropped_chunks"].sum()),
        truncated_chunks=int(columns["truncated_chunks"].sum()),
        truncated_documents=int((columns["truncated_chunks"] > 0).sum()),
        empty_windows=int(((columns["num_chunks"] == 0) & ok).sum()))
    for side, bit in (("teacher", TEACHER), ("student", STUDENT)):
        hit = (unenc & bit) > 0
        out[f"unencodable_{side}_documents"] = int(hit.sum())
        out[f"unencodable_{side}_bytes"] = int(columns["lost_bytes"][hit].sum())
    result = dict(out)
    result["unencodable_examples"] = [p for p in problems if p][:3]
    return result


def pad(rows: list[dict], teacher_start: int, student_start: int) -> dict[str, torch.Tensor]:
    """Aligned rows -> the padded batch, doc-start token first on both sides. Cheap: what
    DataLoader workers do per batch once the rows are cached. Rows that carry the teacher
    cache's columns (`teacher_logprobs`, `teacher_boundary`, one value per teacher position,
    doc-start included) give the batch those columns too."""
    n = len(rows)
    width_t = 1 + max((len(r["teacher_ids"]) for r in rows), default=0)
    width_s = 1 + max((len(r["student_ids"]) for r in rows), default=0)
    t_ids = np.zeros((n, width_t), np.int64)
    s_ids = np.zeros((n, width_s), np.int64)
    t_chunk = np.full((n, width_t), -1, np.int64)
    s_chunk = np.full((n, width_s), -1, np.int64)
    t_mask = np.zeros((n, width_t), np.int64)
    s_mask = np.zeros((n, width_s), np.int64)
    cached = n > 0 and "teacher_logprobs" in rows[0]
    if cached:
        t_lp = np.zeros((n, width_t), np.float32)
        t_bnd = np.zeros((n, width_t), np.float32)
    for b, r in enumerate(rows):
        lt, ls = len(r["teacher_ids"]), len(r["student_ids"])
        t_ids[b, 0], s_ids[b, 0] = teacher_start, student_start
        t_ids[b, 1 : 1 + lt], t_chunk[b, 1 : 1 + lt] = r["teacher_ids"], r["teacher_chunks"]
        s_ids[b, 1 : 1 + ls], s_chunk[b, 1 : 1 + ls] = r["student_ids"], r["student_chunks"]
        t_mask[b, : 1 + lt] = 1
        s_mask[b, : 1 + ls] = 1
        if cached:
            t_lp[b, : 1 + lt], t_bnd[b, : 1 + lt] = r["teacher_logprobs"], r["teacher_boundary"]
    counts = {k: torch.tensor([int(r[k]) for r in rows], dtype=torch.long)
              for k in ("num_chunks", "num_bytes", "dropped_chunks")}
    batch = {
        "teacher_input_ids": torch.from_numpy(t_ids),
        "teacher_attention_mask": torch.from_numpy(t_mask),
        "student_input_ids": torch.from_numpy(s_ids),
        "student_attention_mask": torch.from_numpy(s_mask),
        "teacher_chunk_ids": torch.from_numpy(t_chunk),
        "student_chunk_ids": torch.from_numpy(s_chunk),
        "student_loss_mask": torch.from_numpy(s_chunk >= 0),
        **counts,
    }
    if cached:
        batch["teacher_logprobs"] = torch.from_numpy(t_lp)
        batch["teacher_boundary"] = torch.from_numpy(t_bnd)
    return batch
