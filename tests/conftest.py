"""Shared fixtures: the real tokenizers of the packaged models (tokenizer-only conversion is
seconds; it is cached under $CTD_CACHE like every zoo artefact), and the tiny transplant pair
over them (an untied Gemma-3-shaped base, a SmolLM2-shaped donor) with its resources."""

from __future__ import annotations

import numpy as np
import pytest

from ctd.transplant.vocab import match_vocab
from ctd.zoo import ZOO, load_tokenizer
from tests.tiny import tiny_hypernet, tiny_model, write_vec

REAL = list(ZOO)


@pytest.fixture(scope="session")
def real_tokenizers() -> dict:
    return {name: load_tokenizer(name) for name in REAL}


@pytest.fixture(scope="session")
def smol_tok(real_tokenizers):
    return real_tokenizers["smollm2-135m"]


@pytest.fixture(scope="session")
def gemma_tok(real_tokenizers):
    return real_tokenizers["gemma3-270m"]


@pytest.fixture(scope="session")
def qwen_tok(real_tokenizers):
    return real_tokenizers["qwen2.5-coder-0.5b"]


@pytest.fixture(scope="module")
def gemma_untied(gemma_tok):
    return tiny_model(gemma_tok, arch="gemma3", tied=False, seed=1)


@pytest.fixture(scope="module")
def smol_donor(smol_tok):
    return tiny_model(smol_tok, arch="llama", tied=True, seed=2)


@pytest.fixture(scope="module")
def match(gemma_tok, smol_tok):
    return match_vocab(gemma_tok, smol_tok)


@pytest.fixture(scope="module")
def word_vectors(tmp_path_factory):
    """Random vectors for the words of a wiki-en sample (fastText .vec text format)."""
    from ctd.corpora import load_texts

    text = " ".join(load_texts("wiki-en", split="validation", max_bytes=200_000))
    words = list(dict.fromkeys(w.strip(".,;:()\"'") for w in text.split()))
    words = [w for w in words if w][:5000]
    vectors = np.random.default_rng(0).standard_normal((len(words), 16)).astype(np.float32)
    return words, vectors, write_vec(tmp_path_factory.mktemp("vec") / "en.vec", words, vectors)


@pytest.fixture(scope="module")
def hypernet(tmp_path_factory, gemma_untied, gemma_tok):
    return tiny_hypernet(tmp_path_factory.mktemp("zett"), gemma_untied, gemma_tok)
