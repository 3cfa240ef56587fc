"""The aligner and padding: the batch contract the trainer codes against, windows that cover
every byte, and every awkward input counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ctd.collate import COUNTS, Aligner, pad, stats
from ctd.errors import CtdError
from ctd.tokens import byte_vocab, doc_start_id

KEYS = {
    "teacher_input_ids", "teacher_attention_mask", "student_input_ids", "student_attention_mask",
    "teacher_chunk_ids", "student_chunk_ids", "student_loss_mask", "num_chunks", "num_bytes",
    "dropped_chunks",
}


def covered(tok, ids, chunks) -> bytes:
    pieces = byte_vocab(tok).pieces
    return b"".join(pieces[i] for i, c in zip(ids.tolist(), chunks.tolist(), strict=True) if c >= 0)


def test_batch_contract(gemma_tok, smol_tok):
    aligner = Aligner(gemma_tok, smol_tok, max_length=32)
    b = aligner.batch([{"text": "Hello wörld, unbelievable 🤗!"}, {"text": "short"}])
    assert set(b) == KEYS
    for k in KEYS - {"student_loss_mask"}:
        assert b[k].dtype == torch.long, k
    assert b["student_loss_mask"].dtype == torch.bool
    assert b["teacher_input_ids"][:, 0].eq(doc_start_id(gemma_tok)).all()
    assert b["student_input_ids"][:, 0].eq(doc_start_id(smol_tok)).all()
    assert b["teacher_chunk_ids"][:, 0].eq(-1).all() and not b["student_loss_mask"][:, 0].any()
    # right padding: mask is a prefix of ones; padding has chunk -1
    for side in ("teacher", "student"):
        m = b[f"{side}_attention_mask"]
        assert torch.equal(m, m.cummin(1).values)
        assert b[f"{side}_chunk_ids"][m == 0].eq(-1).all()
    assert torch.equal(b["student_loss_mask"], b["student_chunk_ids"] >= 0)
    assert b["num_chunks"].tolist() == [int(b["teacher_chunk_ids"][i].max()) + 1 for i in range(2)]
    assert b["num_bytes"].tolist() == [len("Hello wörld, unbelievable 🤗!".encode()), 5]
    for i in range(2):  # both sides cover the same bytes
        assert covered(gemma_tok, b["teacher_input_ids"][i], b["teacher_chunk_ids"][i]) == covered(
            smol_tok, b["student_input_ids"][i], b["student_chunk_ids"][i])



def _columns(rows: list[dict]) -> dict:
    return {k: np.asarray([r[k] for r in rows]) for k in COUNTS}


@pytest.mark.parametrize("max_length", [5, 17, 64])
def test_windows_cover_every_byte_once_on_common_boundaries(gemma_tok, qwen_tok, max_length):
    text = "Cross-tokenizer distillation aligns chunks of bytes: naïve café 🤗. " * 12
    rows = Aligner(gemma_tok, qwen_tok, max_length=max_length).rows([{"text": text}])
    assert len(rows) > 1
    b = pad(rows, 0, 0)
    assert b["teacher_input_ids"].shape[1] <= max_length
    assert b["student_input_ids"].shape[1] <= max_length
    joined_t, joined_s = b"", b""
    for i in range(len(rows)):
        t = covered(gemma_tok, b["teacher_input_ids"][i], b["teacher_chunk_ids"][i])
        s = covered(qwen_tok, b["student_input_ids"][i], b["student_chunk_ids"][i])
        assert t == s and len(t) == b["num_bytes"][i]  # both sides, the same bytes
        joined_t, joined_s = joined_t + t, joined_s + s
    assert joined_t == joined_s == text.encode()  # consecutive, nothing lost, nothing twice
    s = stats(_columns(rows))
    assert s["documents"] == 1 and s["windows"] == len(rows) and s["bytes"] == len(text.encode())


def test_first_window_only_when_asked(gemma_tok, qwen_tok):
    text = "Cross-tokenizer distillation aligns chunks of bytes. " * 20
    (row,) = Aligner(gemma_tok, qwen_tok, max_length=17, windows=False).rows([{"text": text}])
    b = pad([row], 0, 0)
    t = covered(gemma_tok, b["teacher_input_ids"][0], b["teacher_chunk_ids"][0])
    assert text.encode().startswith(t) and len(t) == row["num_bytes"]
    assert row["truncated_chunks"] > 0


def test_prompt_is_masked_and_straddling_chunk_dropped(gemma_tok, smol_tok):
    b = Aligner(gemma_tok, smol_tok).batch([
        {"prompt": "Question: 2+2?\nAnswer:", "response": " 4, of course."},
        {"prompt": "ab", "response": "cd"},  # "abcd" is one token: the chunk straddles
    ])
    resp = covered(smol_tok, b["student_input_ids"][0], b["student_chunk_ids"][0])
    assert resp == b" 4, of course." and b["num_bytes"][0] == len(resp)
    assert b["dropped_chunks"].tolist() == [0, 1] and b["num_chunks"][1] == 0
    assert not b["student_loss_mask"][1].any()


@pytest.mark.parametrize("text", ["", "<bos><eos><|endoftext|><s></s>"])
def test_empty_and_special_token_strings(gemma_tok, smol_tok, text):
    b = Aligner(gemma_tok, smol_tok).batch([{"text": text}])
    # special-token strings in a text are literal text on both sides: aligned, not dropped
    assert b["num_bytes"][0] == len(text.encode()) and b["dropped_chunks"][0] == 0
    assert (b["num_chunks"][0] == 0) == (text == "")
    assert b["teacher_attention_mask"].sum() >= 1  # the doc-start token is always there


def _lossy_tokenizer():
    """A BPE without byte fallback: letters outside {a, b} become <unk>."""
    tok = Tokenizer(models.BPE({"a": 0, "b": 1, "<unk>": 2}, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")


def test_unreproducible_text_is_counted_or_with_strict_an_error(smol_tok):
    lossy = _lossy_tokenizer()
    rows = Aligner(lossy, smol_tok).rows([{"text": "abc"}, {"text": "ab"}])
    assert [r["unencodable"] for r in rows] == [1, 0]  # the teacher side failed
    s = stats(_columns(rows), [r["problem"] for r in rows])
    assert s["unencodable_teacher_documents"] == 1 and s["unencodable_teacher_bytes"] == 3
    assert s["unencodable_student_documents"] == 0 and s["unencodable_examples"] == [
        "'c' at byte 2"]
    assert Aligner(lossy, smol_tok).batch([{"text": "abc"}, {"text": "ab"}])[
        "num_chunks"].tolist() == [1]
    with pytest.raises(CtdError, match="document 0: .*byte-exactly"):
        Aligner(lossy, smol_tok, strict=True).rows([{"text": "abc"}])


@pytest.mark.parametrize(("prompt", "response"), [("e", "\u0301"), ("cafe", "\u0301 au lait"),
                                                  ("\u1100", "\u1161\u11a8 done")])
def test_prompt_and_response_are_normalised_joined(qwen_tok, smol_tok, prompt, response):
    """Qwen normalises to NFC: a response starting with a combining mark merges into the
    prompt's last character; normalising the joined text keeps both sides on the same bytes."""
    (row,) = Aligner(qwen_tok, smol_tok).rows([{"prompt": prompt, "response": response}])
    b = pad([row], 0, 0)
    assert covered(qwen_tok, b["teacher_input_ids"][0], b["teacher_chunk_ids"][0]) == covered(
        smol_tok, b["student_input_ids"][0], b["student_chunk_ids"][0])


def test_max_length_must_fit_a_token(smol_tok):
    with pytest.raises(CtdError, match="max_length"):
        Aligner(smol_tok, smol_tok, max_length=1)
