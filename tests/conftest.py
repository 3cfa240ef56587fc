"""Shared fixtures: the real tokenizers of the packaged models (tokenizer-only conversion is
seconds; it is cached under $CTD_CACHE like every zoo artefact)."""

from __future__ import annotations

import pytest

from ctd.zoo import ZOO, load_tokenizer

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
