"""The collator: the batch contract the trainer codes against, and every awkward input counted."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ctd.collate import AlignedCollator
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
    collate = AlignedCollator(gemma_tok, smol_tok, max_length=32)
    b = collate([{"text": "Hello wörld, unbelievable 🤗!"}, {"text": "short"}])
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
    assert collate.stats["examples"] == 2 and collate.stats["chunks"] == int(b["num_chunks"].sum())


def test_truncation_on_a_common_byte_boundary(gemma_tok, qwen_tok):
    text = "Cross-tokenizer distillation aligns chunks of bytes. " * 20
    collate = AlignedCollator(gemma_tok, qwen_tok, max_length=17)
    b = collate([{"text": text}])
    assert b["teacher_input_ids"].shape[1] <= 17 and b["student_input_ids"].shape[1] <= 17
    t = covered(gemma_tok, b["teacher_input_ids"][0], b["teacher_chunk_ids"][0])
    s = covered(qwen_tok, b["student_input_ids"][0], b["student_chunk_ids"][0])
    assert t == s and text.encode().startswith(t) and len(t) == b["num_bytes"][0]
    assert collate.stats["truncated_examples"] == 1 and collate.stats["truncated_chunks"] > 0


def test_prompt_is_masked_and_straddling_chunk_dropped(gemma_tok, smol_tok):
    collate = AlignedCollator(gemma_tok, smol_tok)
    b = collate([
        {"prompt": "Question: 2+2?\nAnswer:", "response": " 4, of course."},
        {"prompt": "ab", "response": "cd"},  # "abcd" is one token: the chunk straddles
    ])
    resp = covered(smol_tok, b["student_input_ids"][0], b["student_chunk_ids"][0])
    assert resp == b" 4, of course." and b["num_bytes"][0] == len(resp)
    assert b["dropped_chunks"].tolist() == [0, 1] and b["num_chunks"][1] == 0
    assert not b["student_loss_mask"][1].any()
    assert collate.stats["dropped_chunks"] == 1


@pytest.mark.parametrize("text", ["", "<bos><eos><|endoftext|><s></s>"])
def test_empty_and_special_token_strings(gemma_tok, smol_tok, text):
    collate = AlignedCollator(gemma_tok, smol_tok)
    b = collate([{"text": text}])
    # special-token strings in a text are literal text on both sides: aligned, not dropped
    assert b["num_bytes"][0] == len(text.encode()) and b["dropped_chunks"][0] == 0
    assert (b["num_chunks"][0] == 0) == (text == "")
    assert collate.stats["empty_examples"] == int(text == "")
    assert b["teacher_attention_mask"].sum() >= 1  # the doc-start token is always there


def _lossy_tokenizer():
    """A BPE without byte fallback: letters outside {a, b} become <unk>."""
    tok = Tokenizer(models.BPE({"a": 0, "b": 1, "<unk>": 2}, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")


def test_unreproducible_text_is_an_error_or_counted(smol_tok):
    lossy = _lossy_tokenizer()
    with pytest.raises(CtdError, match="byte-exactly"):
        AlignedCollator(lossy, smol_tok)([{"text": "abc"}])
    collate = AlignedCollator(lossy, smol_tok, skip_unencodable=True)
    b = collate([{"text": "abc"}, {"text": "ab"}])
    assert b["num_chunks"].tolist() == [0, 1] and collate.stats["unencodable"] == 1


def test_max_length_must_fit_a_token(smol_tok):
    with pytest.raises(CtdError, match="max_length"):
        AlignedCollator(smol_tok, smol_tok, max_length=1)
