"""The aligner on pairs of REAL tokenizers over arbitrary Unicode text (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctd.align import align, chunks_within, common_text, tokens_through
from ctd.errors import CtdError
from ctd.tokens import Encoded, byte_vocab, encode

# Arbitrary Unicode (no surrogates), plus text dense in what breaks aligners: spaces, newlines,
# combining marks, emoji (4-byte characters split by byte-level BPE), digits, CJK.
TRICKY = st.lists(
    st.sampled_from(list(" \n\t  ab1é\u0301ñ🤗👍🏽中文\u200d<>|") + ["<bos>", "<s>", "</s>"]),
    max_size=30,
).map("".join)
TEXTS = st.one_of(st.text(max_size=60), TRICKY)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def token_bytes(tok, enc: Encoded) -> list[bytes]:
    """Bytes each token covers (a SentencePiece prefix space is outside the text)."""
    pieces = byte_vocab(tok).pieces
    return [pieces[i][len(pieces[i]) - n:] for i, n in zip(enc.ids, enc.lengths, strict=True)]


def check(tok_a, tok_b, text: str) -> bool:
    """Assert the invariants; False when a tokenizer refused the text (a byte it lacks)."""
    text = common_text(text, tok_a, tok_b)
    raw = text.encode()
    try:
        ea, eb = encode(tok_a, [text])[0], encode(tok_b, [text])[0]
    except CtdError:  # a vocabulary without some byte (see test_unreproducible_text_is_refused)
        return False
    al = align(ea, eb)
    c = al.num_chunks
    # ordered and disjoint, covering every byte once
    assert np.all(np.diff(al.ends) > 0)
    assert (al.ends[-1] if c else 0) == len(raw)
    starts = np.concatenate([[0], al.ends[:-1]])
    for enc, chunks, tok in ((ea, al.teacher, tok_a), (eb, al.student, tok_b)):
        assert np.all(np.diff(chunks) >= 0)
        assert np.array_equal(np.unique(chunks), np.arange(c))  # every chunk has a token
        pieces = token_bytes(tok, enc)
        for k in range(c):  # identical bytes per chunk on both sides, equal to the text's
            joined = b"".join(p for p, ck in zip(pieces, chunks, strict=True) if ck == k)
            assert joined == raw[starts[k]:al.ends[k]]
    return True


def pairs(request, names):
    return [request.getfixturevalue(n) for n in names]


PAIRS = [
    ("smol_tok", "gemma_tok"),
    ("gemma_tok", "qwen_tok"),
    ("qwen_tok", "smol_tok"),
    ("gemma_tok", "llama_spm_tok"),
    ("llama_spm_tok", "qwen_tok"),
]


@pytest.mark.parametrize("names", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_chunks_cover_every_byte_once_with_equal_bytes(request, names):
    tok_a, tok_b = pairs(request, names)
    checked = []

    @SETTINGS
    @given(TEXTS)
    def run(text):
        checked.append(check(tok_a, tok_b, text))

    run()
    assert sum(checked) >= len(checked) // 2, "most texts were refused: the test says little"


@pytest.mark.parametrize("name", ["smol_tok", "gemma_tok", "llama_spm_tok"])
def test_same_tokenizer_gives_one_token_per_chunk(request, name):
    tok = request.getfixturevalue(name)

    @SETTINGS
    @given(TEXTS)
    def run(text):
        text = common_text(text, tok)
        if not check(tok, tok, text):
            return
        enc = encode(tok, [text])[0]
        al = align(enc, enc)
        # zero-byte tokens (a lone SentencePiece prefix "▁") share their neighbour's chunk
        assert al.num_chunks == int((enc.lengths > 0).sum())
        if np.all(enc.lengths > 0):
            assert np.array_equal(al.teacher, np.arange(len(enc.ids)))

    run()


def test_known_alignment(smol_tok, gemma_tok):
    # Gemma: un|bel|ievable|" 🤗"   SmolLM2: un|belie|vable|" \xf0\x9f"|"\xa4"|"\x97"
    text = "unbelievable 🤗"
    al = align(encode(gemma_tok, [text])[0], encode(smol_tok, [text])[0])
    assert al.ends.tolist() == [2, 12, 17]
    assert al.teacher.tolist() == [0, 1, 1, 2]
    assert al.student.tolist() == [0, 1, 1, 2, 2, 2]


def test_zero_byte_token_joins_a_chunk(llama_spm_tok, smol_tok):
    enc = encode(llama_spm_tok, ["1x"])[0]
    assert enc.lengths.tolist()[0] == 0  # the prefix "▁" before a digit covers no text byte
    al = align(enc, encode(smol_tok, ["1x"])[0])
    assert al.teacher[0] == al.teacher[1] and al.num_chunks >= 1


def test_truncation_stops_both_sides_on_one_boundary(gemma_tok, qwen_tok):
    text = "Alignment truncates at a byte offset where both sides end a token. " * 5
    ea, eb = encode(gemma_tok, [text])[0], encode(qwen_tok, [text])[0]
    al = align(ea, eb)
    for budget_a, budget_b in [(10, 50), (50, 10), (1, 1), (0, 5), (10**6, 10**6)]:
        keep = chunks_within(al, budget_a, budget_b)
        n_a = tokens_through(al.teacher, al.num_chunks)[keep - 1] if keep else 0
        n_b = tokens_through(al.student, al.num_chunks)[keep - 1] if keep else 0
        assert n_a <= budget_a and n_b <= budget_b
        covered = al.ends[keep - 1] if keep else 0
        assert ea.lengths[:n_a].sum() == eb.lengths[:n_b].sum() == covered
        if keep < al.num_chunks:  # maximal: one more chunk would not fit
            assert (tokens_through(al.teacher, al.num_chunks)[keep] > budget_a
                    or tokens_through(al.student, al.num_chunks)[keep] > budget_b)


def test_unreproducible_text_is_refused(smol_tok):
    # SmolLM2's byte-level vocabulary has no token for the byte 0xF1 (leading byte of planes
    # 4-15): its tokenizer silently drops it, and encode refuses rather than misalign.
    with pytest.raises(CtdError, match="cannot reproduce this text byte-exactly"):
        encode(smol_tok, ["a\U00040000b"])


def test_empty_text_has_no_chunks(smol_tok, gemma_tok):
    al = align(encode(gemma_tok, [""])[0], encode(smol_tok, [""])[0])
    assert al.num_chunks == 0 and len(al.teacher) == len(al.student) == 0


def test_different_texts_are_refused(smol_tok):
    a, b = encode(smol_tok, ["hello", "hello!"])
    with pytest.raises(CtdError, match="not the same text"):
        align(a, b)


def test_nfc_is_applied_for_both_sides(qwen_tok, smol_tok):
    text = "cafe\u0301"  # decomposed é: Qwen normalises to NFC, SmolLM2 does not
    check(qwen_tok, smol_tok, text)
    assert common_text(text, qwen_tok, smol_tok) == "caf\u00e9"
