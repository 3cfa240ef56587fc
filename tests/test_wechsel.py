"""WECHSEL from local word vectors (ctd.transplant.wechsel): Procrustes, the row weights, and a
cross-lingual run that must reproduce the one-language rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctd.tokens import byte_vocab
from ctd.transplant.wechsel import WechselResources, procrustes
from tests.tiny import write_vec


def test_procrustes_recovers_a_rotation():
    rng = np.random.default_rng(0)
    src = rng.standard_normal((50, 8))
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    np.testing.assert_allclose(src @ q @ procrustes(src, src @ q), src, atol=1e-10)


def test_wechsel_rows_and_cross_lingual_alignment(tmp_path, gemma_tok, smol_tok, match,
                                                  word_vectors):
    """Each covered row is softmax(cos / 0.1) over its 10 nearest base tokens; target-language
    vectors that are a rotation of the source ones, with an identity dictionary, give the same
    rows as the one-language run."""
    from ctd.transplant.methods import Inputs, method_wechsel
    from ctd.transplant.wechsel import aligned_vectors, token_vectors

    words, vectors, path = word_vectors
    one = WechselResources(path)
    ids, vb = match.new_ids, len(gemma_tok)
    got = method_wechsel(Inputs(match, gemma_tok, smol_tok, None, 10, resources=vars(one)), ids, vb)
    w = got.weights.coalesce()  # sparse [new tokens, 262,144]: dense it would be 3 GB
    covered = (~got.fallback).nonzero().squeeze(1)
    assert len(covered) > 100
    row_sums = torch.zeros(len(ids)).index_add_(0, w.indices()[0], w.values())
    torch.testing.assert_close(row_sums[covered], torch.ones(len(covered)))
    per_row = torch.bincount(w.indices()[0][w.values() > 0], minlength=len(ids))
    assert (w.values() >= 0).all() and (per_row[covered] <= 10).all()
    # the heaviest base token is the most cosine-similar one in word space
    _, src, _, _ = aligned_vectors(one)
    base_vec, base_has = token_vectors(gemma_tok, words, src, vb)
    new_vec, _ = token_vectors(smol_tok, words, src, int(ids.max()) + 1)
    special = torch.from_numpy(byte_vocab_special(gemma_tok, vb))
    for row in covered[:20].tolist():
        cos = torch.nn.functional.cosine_similarity(new_vec[ids[row]][None], base_vec, dim=1)
        cos[~base_has | special] = -2
        in_row = w.indices()[0] == row
        heaviest = w.indices()[1][in_row][w.values()[in_row].argmax()]
        assert cos[heaviest] == pytest.approx(float(cos.max()), abs=1e-3)

    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((16, 16)))
    target = write_vec(tmp_path / "xx.vec", words, (vectors @ q).astype(np.float32), header=False)
    (tmp_path / "dict.txt").write_text("\n".join(f"{x} {x}" for x in words))
    two = WechselResources(path, target, tmp_path / "dict.txt")
    crossed = method_wechsel(Inputs(match, gemma_tok, smol_tok, None, 10, resources=vars(two)), ids, vb)
    assert torch.equal(crossed.fallback, got.fallback)
    torch.testing.assert_close(crossed.weights.coalesce(), w, atol=1e-4, rtol=1e-3)


def byte_vocab_special(tok, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=bool)
    special = byte_vocab(tok).is_special[:size]
    out[: len(special)] = special
    return out
