"""WECHSEL (Minixhofer et al., 2022) from local word vectors: new tokens as a similarity-weighted
mix of base tokens, where similarity is measured in a static word-vector space.

Each token of a tokenizer gets the mean vector of the words whose tokenization contains it
(each word tokenized as it appears mid-sentence, " word", and at a line start, "word"). Base and
new tokens then live in one space: the same vectors for a new tokenizer of the same language,
or target-language vectors rotated onto the source ones by orthogonal Procrustes over a
bilingual dictionary. A new token's row is sum_j softmax(cos / 0.1)_j * base_row_j over its k
most similar base tokens (k = 10). Tokens that no word covers fall back to the mean row.

Resources are files the user already has (nothing is downloaded): word vectors in fastText's
text format (`.vec`, optionally gzipped: an optional "count dim" header, then "word v1 .. vd"),
and for two languages a dictionary with one "source_word target_word" pair per line.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ctd.errors import CtdError

TEMPERATURE = 0.1
MAX_WORDS = 200_000  # the most frequent words of a .vec file (they are sorted by frequency)


@dataclass(frozen=True)
class WechselResources:
    """Word vectors of the base tokenizer's language, and for another target language its
    vectors plus a bilingual dictionary."""

    vectors: Path
    target_vectors: Path | None = None
    dictionary: Path | None = None

    def check(self) -> None:
        """Refuse missing files and an incomplete cross-lingual setup before any loading."""
        for name, path in (("--vectors", self.vectors), ("--target_vectors", self.target_vectors),
                           ("--dictionary", self.dictionary)):
            if path is not None and not Path(path).is_file():
                raise CtdError(f"{name} {path} is not a file")
        if (self.target_vectors is None) != (self.dictionary is None):
            raise CtdError("WECHSEL across languages needs both --target_vectors and --dictionary "
                           "(for one language, give --vectors alone)")


def load_vectors(path: Path, max_words: int = MAX_WORDS) -> tuple[list[str], np.ndarray]:
    """Words and float32 vectors [n, d] of a fastText text file."""
    opener = gzip.open if str(path).endswith(".gz") else open
    words, rows = [], []
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # the "count dim" header
            if len(rows) >= max_words:
                break
            try:
                vec = np.asarray(parts[1:], dtype=np.float32)
            except ValueError:
                raise CtdError(
                    f"{path}:{lineno}: not 'word v1 ... vd' (fastText .vec text format)"
                ) from None
            if rows and len(vec) != len(rows[0]):
                raise CtdError(f"{path}:{lineno}: {len(vec)} values, expected {len(rows[0])}")
            words.append(parts[0])
            rows.append(vec)
    if not rows or len(rows[0]) == 0:
        raise CtdError(f"{path} holds no word vectors (fastText .vec text format expected)")
    return words, np.stack(rows)


def token_vectors(tokenizer, words: list[str], vectors: np.ndarray, size: int
                  ) -> tuple[Tensor, Tensor]:
    """[size, d] mean vector of the words each token occurs in, and which tokens occur."""
    forms = [" " + w for w in words] + words
    ids = tokenizer(forms, add_special_tokens=False)["input_ids"]
    owner = torch.tensor([n % len(words) for n, row in enumerate(ids) for _ in row])
    flat = torch.tensor([i for row in ids for i in row], dtype=torch.long)
    keep = flat < size
    owner, flat = owner[keep], flat[keep]
    vecs = torch.from_numpy(vectors)
    out = torch.zeros(size, vecs.shape[1]).index_add_(0, flat, vecs[owner])
    count = torch.bincount(flat, minlength=size)
    return out / count.clamp_min(1)[:, None], count > 0


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The rotation W minimising ||target @ W - source|| (rows are translation pairs)."""
    u, _, vt = np.linalg.svd(target.T @ source)
    return u @ vt


def aligned_vectors(res: WechselResources) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """(source words, vectors, target words, vectors in the source space)."""
    src_words, src = load_vectors(res.vectors)
    if res.target_vectors is None:
        return src_words, src, src_words, src
    tgt_words, tgt = load_vectors(res.target_vectors)
    if src.shape[1] != tgt.shape[1]:
        raise CtdError(f"--vectors has dimension {src.shape[1]} but --target_vectors "
                       f"{tgt.shape[1]}; use vectors of one size")
    s_index = {w: i for i, w in enumerate(src_words)}
    t_index = {w: i for i, w in enumerate(tgt_words)}
    pairs = []
    with open(res.dictionary, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and parts[0] in s_index and parts[1] in t_index:
                pairs.append((s_index[parts[0]], t_index[parts[1]]))
    if len(pairs) < src.shape[1]:
        raise CtdError(f"only {len(pairs)} dictionary pairs have vectors on both sides; the "
                       f"rotation needs at least {src.shape[1]} (the vector dimension)")
    s, t = np.asarray(pairs).T
    return src_words, src, tgt_words, tgt @ procrustes(src[s], tgt[t])
